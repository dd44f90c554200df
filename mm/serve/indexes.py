"""The ``mm embed`` outputs a server searches (``--index [NAME=]DIR``), and the images they were made from.

A request names an index by its name and a result by its id, never a path: an image is served only for an
id the index holds, found where ``index.json`` says its inputs were (``sources``: folders that file ids are
relative to, shard URLs whose sample keys are the ids), as ``mm search --plot`` finds them. Shards cannot be
seeked, so the first image asked of a shard index reads its shards once and keeps each image's encoded bytes
in memory up to ``cache_bytes`` (the keys beyond it remember their shard, streamed again when asked for).
"""
from __future__ import annotations

import io
import json
import re
import threading
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from ..data.decode import IMAGE_KEYS
from ..data.wds import iter_shard
from ..inference.embed import EmbedError, read_index
from ..inference.search import search
from .limits import IMAGE_FORMATS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BROWSER_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
                 "BMP": "image/bmp"}  # served as stored; other formats (TIFF) are re-encoded as PNG


def parse_index_specs(specs: list[str], what: str | None = None) -> dict[str, Path]:
    """``[NAME=]DIR`` specs -> {name: directory}; the name defaults to the directory's own name. Errors start with
    the spec, after ``what``, the caller's name for it (``mm serve``'s ``--index``)."""
    out: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not NAME_RE.match(name):
            name, path = Path(spec.rstrip("/")).name, spec
        where = f"{what} {spec}" if what else spec
        if not NAME_RE.match(name):
            raise EmbedError(f"{where}: name the index (NAME=DIR; letters, digits, . _ -)")
        if name in out:
            raise EmbedError(f"{where}: two indexes named {name!r} (give one as NAME=DIR)")
        out[name] = Path(path)
    return out


class ServedIndex:
    def __init__(self, name: str, directory: str | Path, cache_bytes: int = 256 * 2**20):
        self.name, self.dir, self.cache_bytes = name, Path(directory), cache_bytes
        self.info = read_index(self.dir)  # EmbedError when the run did not finish
        sources = self.info.get("sources") or {}
        self.roots, self.shards = list(sources.get("roots", [])), list(sources.get("shards", []))
        self._ids: set[str] | None = None
        self._lock = threading.Lock()
        self._cached: dict[str, bytes] | None = None  # shard key -> encoded image (up to cache_bytes)
        self._shard_of: dict[str, str] = {}  # shard key -> its shard URL, for keys not cached

    @property
    def kind(self) -> str:
        return self.info.get("kind", "images")

    @property
    def has_images(self) -> bool:
        return self.kind == "images" and bool(self.roots or self.shards)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.info["count"], "dim": self.info["embed_dim"],
                "model": self.info.get("model"), "images": self.has_images}

    def search(self, queries: np.ndarray, k: int) -> list[list[dict[str, Any]]]:
        """Top-``k`` of each query (rows of L2-normalised embeddings): mm search's exact cosine ranking."""
        scores, ids = search(self.dir, queries, k)
        return [[self._hit(r, float(s), i) for r, (s, i) in enumerate(zip(row_s, row_i), 1)]
                for row_s, row_i in zip(scores, ids)]

    def _hit(self, rank: int, score: float, id_: str) -> dict[str, Any]:
        hit = {"rank": rank, "id": id_, "score": score}
        if self.has_images:
            hit["image"] = f"/v1/indexes/{self.name}/image?id={quote(id_, safe='')}"
        return hit

    # -- source images ---------------------------------------------------------------------------------
    def ids(self) -> set[str]:
        with self._lock:
            if self._ids is None:
                self._ids = {i for p in self.info["parts"]
                             for i in json.loads((self.dir / p["ids"]).read_text())["ids"]}
            return self._ids

    def image(self, id_: str, max_pixels: int) -> tuple[bytes, str] | None:
        """(bytes, content type) of the image the index made id ``id_`` from; None when the index does not hold
        the id, or its image can no longer be found or read."""
        if not self.has_images or id_ not in self.ids():
            return None
        data = self._file(id_) if self.roots else None
        if data is None and self.shards:
            data = self._from_shards(id_)
        return _browser_image(data, max_pixels) if data is not None else None

    def _file(self, id_: str) -> bytes | None:
        for root in [*self.roots, ""]:
            path = Path(root + id_)
            if path.is_file():
                return path.read_bytes()
        return None

    def _from_shards(self, key: str) -> bytes | None:
        with self._lock:
            if self._cached is None:
                self._scan()
            if key in self._cached:
                return self._cached[key]
            url = self._shard_of.get(key)
        if url is None:
            return None
        for sample in iter_shard(url, warn=lambda msg: None):
            if sample["__key__"] == key:
                return _image_member(sample)
        return None

    def _scan(self) -> None:
        cached: dict[str, bytes] = {}
        used = 0
        for url in self.shards:
            for sample in iter_shard(url, warn=lambda msg: None):
                key = sample["__key__"]
                if key in cached or key in self._shard_of:
                    continue  # a key repeated across shards: the first wins, as for mm search --plot
                data = _image_member(sample)
                if data is not None and used + len(data) <= self.cache_bytes:
                    cached[key] = data
                    used += len(data)
                elif data is not None:
                    self._shard_of[key] = url
        self._cached = cached


def _image_member(sample: dict[str, Any]) -> bytes | None:
    return next((sample[k] for k in IMAGE_KEYS if k in sample), None)


def _browser_image(data: bytes, max_pixels: int) -> tuple[bytes, str] | None:
    """Stored bytes as they are when a browser shows the format, else re-encoded as PNG; None if unreadable."""
    try:
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        if img.width * img.height > max_pixels:
            return None
        if img.format in BROWSER_TYPES:
            return data, BROWSER_TYPES[img.format]
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "image/png"
    except Exception:  # noqa: BLE001 - a broken stored image is "not found", not a server error
        return None
