"""The indexes a server searches (``--index NAME=SHARD[,SHARD...]``), and the images they were made from.

A shard is an ``mm embed`` output (exact search), an ``mm index build`` output (approximate: its faiss index,
exact on request while its embed output is there) or another ``mm serve`` process's index, given as
``http://HOST:PORT/NAME`` (asked with the query's embedding, so a collection too large for one machine is
served by several processes behind one query). An index of several shards answers with the
best ``k`` of all of them, each hit once.

A request names an index by its name and a result by its id, never a path: an image is served only for an
id a shard holds, found where its ``index.json`` says its inputs were (``sources``: folders that file ids are
relative to, shard URLs whose sample keys are the ids), as ``mm search --plot`` finds them, or asked of the
remote server that holds it. Webdataset shards cannot be seeked, so the first image asked of such an index reads
its shards once and keeps each image's encoded bytes in memory up to ``cache_bytes`` (the keys beyond it remember
their shard, streamed again when asked for). Several shards' answers merge with
:func:`mm.inference.search.merge_topk`.
"""
from __future__ import annotations

import io
import json
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image

from ..data.decode import IMAGE_KEYS
from ..data.wds import iter_shard
from ..inference.ann import AnnError, is_ann, read_ann
from ..inference.ann import search as ann_search
from ..inference.embed import EmbedError, read_index
from ..inference.search import merge_topk, search
from .limits import IMAGE_FORMATS

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
BROWSER_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif",
                 "BMP": "image/bmp"}  # served as stored; other formats (TIFF) are re-encoded as PNG
REMOTE_TIMEOUT = 30.0  # seconds a remote shard may take to answer


class ShardUnavailable(Exception):
    """A remote shard did not answer a search (the server answers 502 naming it)."""


class ExactUnavailable(Exception):
    """Exact search was asked of an approximate index whose embed output this server cannot read."""


def is_remote(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def parse_index_specs(specs: list[str], what: str | None = None) -> dict[str, list[str]]:
    """``[NAME=]SHARD[,SHARD...]`` specs -> {name: [shard, ...]}; a shard is a directory or a remote index URL, the
    name defaults to the (first) shard's last path segment. Errors start with the spec, after ``what``, the
    caller's name for it (``mm serve``'s ``--index``)."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not sep or not NAME_RE.match(name):
            name, rest = None, spec
        shards = [s for s in rest.split(",") if s]
        where = f"{what} {spec}" if what else spec
        if not shards:
            raise EmbedError(f"{where}: no index directory or URL")
        name = name or shards[0].rstrip("/").rsplit("/", 1)[-1]
        if not NAME_RE.match(name):
            raise EmbedError(f"{where}: name the index (NAME=DIR; letters, digits, . _ -)")
        if name in out:
            raise EmbedError(f"{where}: two indexes named {name!r} (give one as NAME=DIR)")
        out[name] = shards
    return out


# -- shards ------------------------------------------------------------------------------------------
class LocalShard:
    """An ``mm embed`` or ``mm index build`` output on this machine."""

    def __init__(self, directory: str | Path, cache_bytes: int = 256 * 2**20):
        self.dir, self.cache_bytes = Path(directory), cache_bytes
        self.where = str(self.dir)
        self.ann = read_ann(self.dir) if is_ann(self.dir) else None  # AnnError: an unfinished build
        if self.ann:
            emb = Path(self.ann["embeddings"])
            self.exact_dir = emb if (emb / "index.json").is_file() else None
            self.info = {**self.ann["embed"], "count": self.ann["count"], "parts": self.ann["parts"]}
        else:
            self.exact_dir = self.dir
            self.info = read_index(self.dir)  # EmbedError when the run did not finish
        sources = self.info.get("sources") or {}
        self.roots, self.shards = list(sources.get("roots", [])), list(sources.get("shards", []))
        self._ids: set[str] | None = None
        self._lock = threading.Lock()
        self._cached: dict[str, bytes] | None = None  # shard key -> encoded image (up to cache_bytes)
        self._shard_of: dict[str, str] = {}  # shard key -> its shard URL, for keys not cached

    @property
    def has_images(self) -> bool:
        return self.info.get("kind", "images") == "images" and bool(self.roots or self.shards)

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, list[list[str]]]:
        if self.ann and not exact:
            return ann_search(self.dir, queries, k)
        if self.exact_dir is None:
            raise ExactUnavailable(f"the embed output it was built from ({self.ann['embeddings']}) is not on this "
                                   "server: it answers approximately only")
        return search(self.exact_dir, queries, k)

    def ids(self) -> set[str]:
        with self._lock:
            if self._ids is None:
                self._ids = {i for p in self.info["parts"]
                             for i in json.loads((self.dir / p["ids"]).read_text())["ids"]}
            return self._ids

    def image(self, id_: str, max_pixels: int) -> tuple[bytes, str] | None:
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


class RemoteShard:
    """An index another ``mm serve`` process serves, ``http://HOST:PORT[/PREFIX]/NAME``: searched with the query's
    embedding (POST /v1/search), its images fetched from it. ``api_key``: sent as X-API-Key when set."""

    def __init__(self, url: str, api_key: str | None = None):
        self.base, _, self.name = url.rstrip("/").rpartition("/")
        self.where, self.api_key = url, api_key
        if not self.base or not NAME_RE.match(self.name):
            raise EmbedError(f"{url}: a remote index is http://HOST:PORT/NAME (NAME: the index's name there)")
        try:
            served = self._call("/v1/info")
        except ShardUnavailable as e:
            raise EmbedError(str(e)) from None
        if self.name not in served.get("indexes", {}):
            raise EmbedError(f"{url}: the server at {self.base} serves no index {self.name!r} (it serves: "
                             f"{', '.join(served.get('indexes', {})) or 'none'})")
        d = served["indexes"][self.name]
        self.info = {"kind": d["kind"], "count": d["count"], "embed_dim": d["dim"], "model": d.get("model"),
                     "model_fingerprint": d.get("model_fingerprint"), "seq_len": d.get("seq_len")}
        self.has_images = bool(d.get("images"))

    def _call(self, path: str, body: dict[str, Any] | None = None, raw: bool = False) -> Any:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if self.api_key:
            headers["X-API-Key"] = self.api_key
        req = urllib.request.Request(self.base + path, data=None if body is None else json.dumps(body).encode(),
                                     headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=REMOTE_TIMEOUT) as r:
                data = r.read()
                return (data, r.headers.get("Content-Type", "")) if raw else json.loads(data)
        except urllib.error.HTTPError as e:
            if raw and e.code == 404:
                return None
            detail = e.read().decode(errors="replace")[:200]
            raise ShardUnavailable(f"{self.where}: {self.base}{path} answered {e.code}: {detail}") from None
        except (OSError, ValueError) as e:  # refused, timed out, not JSON
            raise ShardUnavailable(f"{self.where}: {self.base}{path} did not answer ({e})") from None

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> tuple[np.ndarray, list[list[str]]]:
        scores, ids = [], []
        for q in queries:
            hits = self._call("/v1/search", {"embedding": [float(v) for v in q], "index": self.name, "k": k,
                                             "exact": exact})["results"][self.name]
            scores.append([h["score"] for h in hits] + [-np.inf] * (k - len(hits)))
            ids.append([h["id"] for h in hits])
        return np.array(scores, np.float32).reshape(len(queries), k), ids

    def image(self, id_: str, max_pixels: int) -> tuple[bytes, str] | None:
        if not self.has_images:
            return None
        try:
            got = self._call(f"/v1/indexes/{self.name}/image?id={urllib.parse.quote(id_, safe='')}", raw=True)
        except ShardUnavailable:
            return None
        return got


# -- an index: one or several shards ------------------------------------------------------------------
class ServedIndex:
    def __init__(self, name: str, shards: list[str | Path] | str | Path, cache_bytes: int = 256 * 2**20,
                 api_key: str | None = None):
        self.name = name
        specs = [shards] if isinstance(shards, (str, Path)) else list(shards)
        try:
            self.shards = [RemoteShard(str(s), api_key) if is_remote(str(s)) else LocalShard(s, cache_bytes)
                           for s in specs]
        except AnnError as e:
            raise EmbedError(str(e)) from None
        first = self.shards[0].info
        for s in self.shards[1:]:
            for key, what in (("embed_dim", "embedding width"), ("kind", "kind"), ("seq_len", "image reading"),
                              ("model_fingerprint", "model (weights fingerprint)")):
                if s.info.get(key) != first.get(key):
                    raise EmbedError(f"index {name}: shard {s.where} differs from {self.shards[0].where} in its "
                                     f"{what} ({s.info.get(key)} vs {first.get(key)}): shards of one index must "
                                     "come from the same model and inputs of one kind")
        self.info = {**first, "count": sum(s.info["count"] for s in self.shards)}
        self._pool = ThreadPoolExecutor(len(self.shards), thread_name_prefix=f"index-{name}") \
            if len(self.shards) > 1 else None

    @property
    def kind(self) -> str:
        return self.info.get("kind", "images")

    @property
    def has_images(self) -> bool:
        return any(s.has_images for s in self.shards)

    @property
    def approximate(self) -> bool:
        return any(getattr(s, "ann", None) for s in self.shards)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "count": self.info["count"], "dim": self.info["embed_dim"],
                "model": self.info.get("model"), "model_fingerprint": self.info.get("model_fingerprint"),
                "seq_len": self.info.get("seq_len"), "images": self.has_images, "shards": len(self.shards),
                "approximate": self.approximate}

    def search(self, queries: np.ndarray, k: int, exact: bool = False) -> list[list[dict[str, Any]]]:
        """Top-``k`` of each query (rows of L2-normalised embeddings) over every shard: cosine scores, best first
        (an exact shard ranks as mm search does, an approximate one as mm search --index on it). Raises
        ShardUnavailable / ExactUnavailable."""
        if self._pool is None:
            found = [self.shards[0].search(queries, k, exact)]
        else:
            found = list(self._pool.map(lambda s: s.search(queries, k, exact), self.shards))
        scores, ids = found[0] if len(found) == 1 else merge_topk(found, k)
        return [[self._hit(r, float(s), i) for r, (s, i) in enumerate(zip(row_s, row_i), 1)]
                for row_s, row_i in zip(scores, ids)]

    def _hit(self, rank: int, score: float, id_: str) -> dict[str, Any]:
        hit = {"rank": rank, "id": id_, "score": score}
        if self.has_images:
            hit["image"] = f"/v1/indexes/{self.name}/image?id={quote(id_, safe='')}"
        return hit

    def image(self, id_: str, max_pixels: int) -> tuple[bytes, str] | None:
        """(bytes, content type) of the image a shard made id ``id_`` from; None when no shard holds the id, or
        its image can no longer be found or read."""
        for s in self.shards:
            found = s.image(id_, max_pixels)
            if found is not None:
                return found
        return None


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
