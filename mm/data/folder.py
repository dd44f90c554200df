"""Images given on the command line: files and folders (searched recursively), read safely."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from PIL import Image

from .decode import MAX_PIXELS, BadSample, to_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named in ``inputs``, folders expanded recursively in sorted order. A path that does not
    exist is an error naming it (before any work starts)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such image file or folder: {p}")
    return out


def load_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An RGB PIL image, fully read; BadSample (naming the reason) if it cannot be decoded."""
    try:
        with Image.open(path) as f:
            if f.width * f.height > max_pixels:
                raise BadSample("image too large", f"{f.width}x{f.height} pixels")
            f.load()
            return to_rgb(f).copy()
    except BadSample:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        raise BadSample("undecodable image", f"{type(e).__name__}: {e}") from None
