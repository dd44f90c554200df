"""Turning raw webdataset samples (dicts of bytes) into tensors, and saying exactly why one is unusable.

Every rejection raises :class:`BadSample` with a short reason ("undecodable image", "no caption", ...);
the pipeline skips the sample, counts the reason and names the sample in the log. Nothing here is fatal.
"""
from __future__ import annotations

import io
import json
import random
import warnings
from typing import Any, Callable

import numpy as np
from PIL import Image, ImageOps

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # the sample members holding an image, first present wins
MAX_PIXELS = 89_478_485  # larger images are refused as decompression bombs (PIL's default threshold)


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short, countable phrase."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image, upright (EXIF orientation applied), with alpha composited on white.

    Handles grayscale, palette (with or without transparency), RGBA/LA, CMYK and 16-bit images.
    Images with more than ``max_pixels`` pixels are rejected from the header alone, before decoding.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("too many pixels", f"{w}x{h} > {max_pixels}")
            if w < 1 or h < 1:
                raise BadSample("empty image", f"{w}x{h} pixels")
            img.load()  # a truncated or corrupt file fails here
    except BadSample:
        raise
    except Image.DecompressionBombError as e:
        raise BadSample("too many pixels", str(e)) from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise BadSample("undecodable image", f"{type(e).__name__}: {e}") from None
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not cost the image
        pass
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # 16/32-bit: PIL's convert("RGB") clips to 255, which turns most 16-bit images white.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_text(data: bytes | None) -> str:
    if data is None:
        raise BadSample("no caption")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadSample("caption not UTF-8", str(e)) from None
    text = text.strip()
    if not text:
        raise BadSample("empty caption")
    return text


class SampleDecoder:
    """Picklable callable: raw sample -> dict with ``image`` (tensor) and ``text`` / ``label`` / ``captions`` /
    ``info``.

    ``need`` lists what this pipeline needs ("text", "label", "captions", "info": the sample's ``json`` member
    as a dict, ``{}`` when it has none); a sample lacking one (or with a ``json`` that does not parse to an object
    when "info" is needed) is a BadSample. ``transform(img, rng)`` receives a per-sample ``random.Random`` so augmentation is
    reproducible from the sample's position alone (exact resume, any number of workers).
    """

    def __init__(
        self,
        transform: Callable[..., Any],
        *,
        image_keys: list[str],
        text_key: str = "txt",
        label_key: str = "cls",
        need: tuple[str, ...] = ("text",),
        max_pixels: int = MAX_PIXELS,
        random_caption: bool = False,
        raw_image: bool = False,
    ):
        self.transform = transform
        self.raw_image = raw_image  # the transform takes the encoded bytes (decoding on the device)
        self.random_caption = random_caption
        self.image_keys = list(image_keys)
        self.text_key, self.label_key = text_key, label_key
        self.need = need
        self.max_pixels = max_pixels

    def __call__(self, sample: dict[str, Any], rng: random.Random | None = None) -> dict[str, Any]:
        key = next((k for k in self.image_keys if k in sample), None)
        if key is None:
            raise BadSample("no image", f"members: {sorted(k for k in sample if not k.startswith('__'))}")
        out: dict[str, Any] = {}
        if "text" in self.need:
            if self.random_caption:  # one of the json captions, drawn with the sample's own rng
                caps = self._captions(sample)
                out["text"] = caps[rng.randrange(len(caps))] if rng is not None else caps[0]
            else:
                out["text"] = decode_text(sample.get(self.text_key))
        if "label" in self.need:
            raw = sample.get(self.label_key)
            if raw is None:
                raise BadSample("no label", f"missing {self.label_key!r}")
            try:
                out["label"] = int(raw.decode("utf-8").strip())
            except (UnicodeDecodeError, ValueError):
                raise BadSample("bad label", repr(raw[:20])) from None
        if "captions" in self.need:
            out["captions"] = self._captions(sample)
        if "info" in self.need:
            out["info"] = self._json(sample) or {}
        img = sample[key] if self.raw_image else decode_image(sample[key], self.max_pixels)
        out.update(self.image_fields(img, out, rng))
        return out

    def set_seq_len(self, seq_len: int) -> None:
        """NaFlex: the sequence length of the batch being made (the token-budget schedule, mm.data.naflex)."""
        set_len = getattr(self.transform, "set_seq_len", None)
        if set_len is None:
            raise TypeError(f"{type(self.transform).__name__} makes square images: a token budget needs NaFlex "
                            "patches (mm.data.transforms.NaFlexTransform)")
        set_len(seq_len)

    def image_fields(self, img: Any, out: dict[str, Any], rng: random.Random | None) -> dict[str, Any]:
        """What the decoded image gives the sample (``out``: its fields so far): ``image``, the transform's output.
        A subclass adds more views of the same image (mm.data.views)."""
        return {"image": self.transform(img, rng)}

    @staticmethod
    def _json(sample: dict[str, Any]) -> dict[str, Any] | None:
        """The sample's ``json`` member as a dict (None without one)."""
        raw = sample.get("json")
        if raw is None:
            return None
        try:
            info = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadSample("bad json") from None
        if not isinstance(info, dict):
            raise BadSample("bad json", f"a {type(info).__name__}, not an object")
        return info

    def _captions(self, sample: dict[str, Any]) -> list[str]:
        caps = (self._json(sample) or {}).get("captions")
        if isinstance(caps, list) and caps and all(isinstance(c, str) and c.strip() for c in caps):
            return [c.strip() for c in caps]
        return [decode_text(sample.get(self.text_key))]
