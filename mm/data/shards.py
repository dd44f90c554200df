"""Writing webdataset shards: plain tar files of ``KEY.jpg|png|webp``, ``KEY.txt``, ``KEY.cls``, ``KEY.json``.

The layout matches ``../shared/datasets`` (what the training pipeline reads). Shards are written under a
temporary name and renamed when complete, with fixed tar metadata (mtime 0, uid/gid 0, mode 0o644, gzip
mtime 0) so the same input gives byte-identical shards. ``info.json`` beside the shards records sample
counts, class names and the samples skipped by validation (counted per reason, never fatal).
"""
from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import re
import tarfile
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from ..utils.io import tmp_path, write_json_atomic

DEFAULT_MAX_PIXELS: int | None = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb threshold
KEEP_FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # MPO: camera JPEG + extra frames
IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
SHOWN_PER_REASON = 10   # skipped paths printed per reason
KEPT_PER_REASON = 100   # skipped paths kept per reason in info.json (a huge crawl may skip millions)


class SkipSample(Exception):
    """A sample that cannot be written; ``reason`` is the short key counted in info.json ``skipped``."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    # Another module may have relaxed these process-wide globals (webdataset users often set
    # LOAD_TRUNCATED_IMAGES); validation must still reject truncated files and apply *our* pixel limit.
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = None, False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def check_image(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[bytes, str, int, int]:
    """Validate encoded image bytes; return ``(bytes, ext, width, height)`` or raise :class:`SkipSample`.

    JPEG/PNG/WebP keep their bytes (``ext`` from the decoded format, not the file name); any other format
    is re-encoded to JPEG q=95 (first frame, alpha composited on white). ``max_pixels=None``: no limit.
    """
    with _strict_pil():
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h, fmt = im.width, im.height, im.format
                if max_pixels is not None and w * h > max_pixels:  # checked on the header: never decode a bomb
                    raise SkipSample("too many pixels", f"{w}x{h} > {max_pixels}")
                im.verify()  # structural checks (PNG CRCs, ...); the handle is unusable afterwards
            with Image.open(io.BytesIO(data)) as im:
                im.load()  # a real decode: catches truncated and corrupt pixel data that verify() misses
                if fmt in KEEP_FORMATS:
                    return data, KEEP_FORMATS[fmt], w, h
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    rgba = im.convert("RGBA")
                    rgb = Image.new("RGB", im.size, (255, 255, 255))
                    rgb.paste(rgba, mask=rgba.getchannel("A"))
                else:
                    rgb = im.convert("RGB")
                buf = io.BytesIO()
                rgb.save(buf, "JPEG", quality=95)
                return buf.getvalue(), "jpg", w, h
        except SkipSample:
            raise
        except Exception as e:  # noqa: BLE001  PIL raises OSError, SyntaxError, ValueError, struct.error...
            raise SkipSample("undecodable image", f"{type(e).__name__}: {e}") from None


class ShardWriter:
    """Write samples into ``out_dir/PREFIX-000000.tar`` ... (``.tar.gz`` with ``compress=True``).

    Keys must be strictly increasing (so each shard is in sorted key order) and contain no dots or slashes.
    ``close()`` writes ``info_name`` (``None``: don't write) and returns the info dict:
    ``{"num_samples", "shards": [{"name", "num_samples"}], "classes"?, "num_classes"?, "skipped": {reason: n},
    "skipped_files": {reason: [paths]}, **extras}``. Used as a context manager, an exception discards the
    shard being written (finished shards stay, no info.json is written).
    """

    def __init__(self, out_dir: str | Path, prefix: str = "train", samples_per_shard: int = 1000,
                 compress: bool = False, classes: list[str] | None = None, extras: dict[str, Any] | None = None,
                 info_name: str | None = "info.json", verbose: bool = True):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if not prefix or re.search(r"[./\\]", prefix):
            raise ValueError(f"prefix must be a plain name without dots or slashes, got {prefix!r}")
        self.out_dir, self.prefix, self.samples_per_shard = Path(out_dir), prefix, samples_per_shard
        self.compress, self.classes, self.extras = compress, classes, dict(extras or {})
        self.info_name, self.verbose = info_name, verbose
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shards: list[dict[str, Any]] = []
        self.skipped: Counter[str] = Counter()
        self.skipped_files: dict[str, list[str]] = defaultdict(list)
        self.max_label = -1
        self._last_key: str | None = None
        self._file = self._gz = self._tar = None
        self._count = 0  # samples in the open shard
        self.info: dict[str, Any] | None = None  # set by close()

    # -- writing ---------------------------------------------------------------------------------
    def write(self, key: str, image_bytes: bytes, ext: str, caption: str | None = None,
              label: int | None = None, meta: dict[str, Any] | None = None,
              extra_members: dict[str, bytes] | None = None) -> None:
        """Write one sample. ``extra_members``: more members as ``{ext: bytes}`` (``{"seg.png": ...}`` becomes
        ``KEY.seg.png``); an ext is letters, digits, ``_`` and inner dots, and may not repeat another member's."""
        if not key or re.search(r"[./\\]", key):
            raise ValueError(f"sample key must be non-empty without dots or slashes, got {key!r}")
        if self._last_key is not None and key <= self._last_key:
            raise ValueError(f"keys must be strictly increasing (sorted shards): {key!r} after {self._last_key!r}")
        ext = ext.lower().lstrip(".")
        ext = "jpg" if ext == "jpeg" else ext
        members = {ext: image_bytes}
        if caption is not None:
            members["txt"] = caption.encode("utf-8")
        if label is not None:
            if label < 0 or (self.classes is not None and label >= len(self.classes)):
                raise ValueError(f"label {label} out of range for {key!r}")
            members["cls"] = str(int(label)).encode()
            self.max_label = max(self.max_label, int(label))
        if meta is not None:
            members["json"] = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        for ext_, data in (extra_members or {}).items():
            if not re.fullmatch(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*", ext_) or ext_.lower() in members:
                raise ValueError(f"extra member {ext_!r} of {key!r}: not a plain extension, or one already written")
            members[ext_.lower()] = bytes(data)
        if self._tar is None:
            self._open_shard()
        for ext_ in sorted(members):  # members of a sample in name order, as in ../shared/datasets
            ti = tarfile.TarInfo(f"{key}.{ext_}")
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(members[ext_]), 0, 0o644, 0, 0, "", ""
            self._tar.addfile(ti, io.BytesIO(members[ext_]))
        self._last_key = key
        self._count += 1
        if self._count >= self.samples_per_shard:
            self._finish_shard()

    def skip(self, reason: str, source: str, detail: str = "") -> None:
        """Record a sample that was not written (reported by ``close()``)."""
        self.skipped[reason] += 1
        if len(self.skipped_files[reason]) < KEPT_PER_REASON:
            self.skipped_files[reason].append(f"{source} ({detail})" if detail else source)

    def _name(self, idx: int) -> str:
        return f"{self.prefix}-{idx:06d}.tar" + (".gz" if self.compress else "")

    def _open_shard(self) -> None:
        name = self._name(len(self.shards))
        self._file = open(tmp_path(self.out_dir / name), "wb")
        # filename="" and mtime=0 keep the temporary name and the clock out of the gzip header.
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._file, mtime=0, compresslevel=6) \
            if self.compress else None
        self._tar = tarfile.open(fileobj=self._gz or self._file, mode="w", format=tarfile.PAX_FORMAT)
        self._count = 0

    def _finish_shard(self) -> None:
        name = self._name(len(self.shards))
        self._tar.close()
        if self._gz is not None:
            self._gz.close()
        self._file.flush()
        os.fsync(self._file.fileno())  # the rename must not outrun the data on a crash
        self._file.close()
        os.replace(tmp_path(self.out_dir / name), self.out_dir / name)
        self.shards.append({"name": name, "num_samples": self._count})
        self._file = self._gz = self._tar = None

    def close(self) -> dict[str, Any]:
        if self.info is not None:  # idempotent: __exit__ after an explicit close()
            return self.info
        if self._tar is not None:
            self._finish_shard()
        self._remove_stale()
        info: dict[str, Any] = {"num_samples": sum(s["num_samples"] for s in self.shards), "shards": self.shards}
        if self.classes is not None:
            info["classes"] = list(self.classes)
        if self.max_label >= 0:
            info["num_classes"] = len(self.classes) if self.classes is not None else self.max_label + 1
        info["skipped"] = dict(sorted(self.skipped.items()))
        info["skipped_files"] = {r: self.skipped_files[r] for r in sorted(self.skipped_files)}
        info.update(self.extras)
        if self.info_name is not None:
            write_json_atomic(self.out_dir / self.info_name, info)
        if self.verbose:
            print_summary(info, self.out_dir)
        self.info = info
        return info

    def _remove_stale(self) -> None:
        # Shards of this prefix left by an earlier, larger run would otherwise be picked up by a glob.
        written = {s["name"] for s in self.shards}
        pattern = re.compile(rf"{re.escape(self.prefix)}-\d{{6}}\.tar(\.gz)?(\.tmp)?")
        for p in sorted(self.out_dir.iterdir()):
            if pattern.fullmatch(p.name) and p.name not in written:
                p.unlink()
                if self.verbose:
                    print(f"removed stale {p}")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._file is not None:  # discard the unfinished shard; finished ones stay, no info.json
            self._file.close()
            tmp_path(self.out_dir / self._name(len(self.shards))).unlink(missing_ok=True)



def print_summary(info: dict[str, Any], out_dir: Path) -> None:
    print(f"wrote {info['num_samples']} samples in {len(info['shards'])} shards to {out_dir}")
    for reason, n in info.get("skipped", {}).items():
        print(f"skipped {n} ({reason}):")
        files = info.get("skipped_files", {}).get(reason, [])
        for f in files[:SHOWN_PER_REASON]:
            print(f"  {f}")
        if n > SHOWN_PER_REASON:
            print(f"  ... {n - SHOWN_PER_REASON} more (up to {KEPT_PER_REASON} listed in info.json)")


# -- tables --------------------------------------------------------------------------------------
