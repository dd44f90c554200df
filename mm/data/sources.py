"""Shard sources: CSV / TSV / JSONL tables of (image, caption[, label]) and img2dataset output into shards, and
shards back out as files. Validation and writing live in :mod:`mm.data.shards`; ``mm shards`` in
:mod:`mm.cli.shards`."""
from __future__ import annotations

import csv
import io
import json
import re
import sys
import tarfile
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .shards import DEFAULT_MAX_PIXELS, IMAGE_EXTS, ShardWriter, SkipSample, check_image
from .wds import SHARD_SUFFIXES, check_urls, iter_shard


def read_table(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a CSV / TSV (header row; delimiter by extension, else sniffed) or JSONL / JSON-array file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"table file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often prepend a BOM
    ext, head = path.suffix.lower(), text.lstrip()[:1]
    if ext in (".jsonl", ".ndjson", ".json") or head in ("{", "["):
        try:
            return json.loads(text) if head == "[" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not JSON lines: {e}") from None
    delimiter = {".tsv": "\t", ".tab": "\t", ".csv": ","}.get(ext)
    if delimiter is None:
        try:
            delimiter = csv.Sniffer().sniff(text[:65536], delimiters=",\t;|").delimiter
        except csv.Error:
            delimiter = ","
    return list(csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter))


def _labels(raw: list[Any], classes: list[str] | None) -> tuple[list[int | str], list[str] | None]:
    """Map raw label cells to ints (an error string for bad ones) and the class list to store.

    All-integer columns are indices; otherwise every value is a class name, indexed in sorted order
    (or by position in ``classes`` when given).
    """
    cells = [str(v).strip() if v is not None else "" for v in raw]
    present = [c for c in cells if c]
    if present and all(re.fullmatch(r"-?\d+", c) for c in present):
        out: list[int | str] = [("missing label" if not c else "invalid label" if int(c) < 0 or
                                 (classes is not None and int(c) >= len(classes)) else int(c)) for c in cells]
        return out, classes
    names = list(classes) if classes is not None else sorted(set(present))
    index = {n: i for i, n in enumerate(names)}
    return [("missing label" if not c else index.get(c, "unknown class")) for c in cells], names


def from_table(table_path: str | Path, image_root: str | Path | None, out_dir: str | Path, prefix: str = "train",
               image_col: str = "image", caption_col: str = "caption", label_col: str | None = None,
               samples_per_shard: int = 1000, classes: list[str] | None = None, compress: bool = False,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, extras: dict[str, Any] | None = None,
               verbose: bool = True) -> dict[str, Any]:
    """Shard a table of (image path, caption[, label]); returns the info dict also written to info.json.

    Image paths are relative to ``image_root`` (default: the table's folder) unless absolute. Rows naming the
    same image become one sample: ``txt`` = first caption, json ``captions`` = all of them. A JSONL caption
    may also be a list. Keys are the sample's position in the table (first appearance), zero-padded.
    """
    table_path = Path(table_path)
    rows = read_table(table_path)
    root = Path(image_root) if image_root is not None else table_path.parent
    if not root.is_dir():
        raise FileNotFoundError(f"image root folder not found: {root}")
    for col in [image_col, caption_col] + ([label_col] if label_col else []):
        if rows and not any(col in r for r in rows):  # any(): JSONL rows need not share every field
            raise ValueError(f"{table_path}: no column {col!r} (columns: {', '.join(map(str, rows[0]))})")
    # image path -> {"captions", "label"} in first-seen order; the first row's label wins. Rows without a
    # path get their own entry (and are skipped as "missing file").
    groups: dict[str, dict[str, Any]] = {}
    for n, row in enumerate(rows):
        img = str(row.get(image_col) or "").strip()
        g = groups.setdefault(img or f"\0{n}", {"captions": [], "label": row.get(label_col) if label_col else None})
        caps = row.get(caption_col)
        for c in caps if isinstance(caps, list) else [caps]:
            if c is not None and str(c).strip():
                g["captions"].append(str(c).strip())
    labels, names = _labels([g["label"] for g in groups.values()], classes) if label_col else (None, None)
    width = max(9, len(str(len(groups))))
    with ShardWriter(out_dir, prefix, samples_per_shard, compress, names, extras, verbose=verbose) as w:
        for i, (img, g) in enumerate(groups.items()):
            img = "" if img.startswith("\0") else img
            try:
                label = labels[i] if labels is not None else None
                if isinstance(label, str):
                    raise SkipSample(label, f"label {g['label']!r}")
                data = _read_file(root / img if img else None)
                if not g["captions"]:
                    raise SkipSample("empty caption")
                data, ext, wd, ht = check_image(data, max_pixels)
            except SkipSample as e:
                w.skip(e.reason, img or f"row for sample {i}", e.detail)
                continue
            meta: dict[str, Any] = {"source": img, "width": wd, "height": ht}
            if len(g["captions"]) > 1:
                meta["captions"] = g["captions"]
            w.write(f"{i:0{width}d}", data, ext, g["captions"][0], label, meta)
    return w.info


def _read_file(path: Path | None) -> bytes:
    if path is None or not path.is_file():
        raise SkipSample("missing file", str(path) if path else "no path")
    try:
        return path.read_bytes()
    except OSError as e:
        raise SkipSample("unreadable file", f"{type(e).__name__}: {e}") from None


# -- img2dataset ---------------------------------------------------------------------------------
def _key_ext(name: str) -> tuple[str, str]:
    # webdataset convention: the key is everything before the first dot of the file name.
    d, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext.lower()


def _iter_files_layout(root: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    groups: dict[str, dict[str, Path]] = defaultdict(dict)
    for p in root.rglob("*"):
        if p.is_file():
            key, ext = _key_ext(p.relative_to(root).as_posix())
            groups[key][ext] = p
    for key in sorted(groups):
        g = groups[key]
        # Parquet / *_stats.json beside the folders are not samples; a sample has an image or a caption.
        if any(e in IMAGE_EXTS or e == "txt" for e in g):
            yield key, {e: p.read_bytes() for e, p in g.items()}


def _iter_tar_layout(tars: list[Path], root: Path,
                     bad: list[tuple[str, str]]) -> Iterator[tuple[str, dict[str, bytes]]]:
    for tar_path in tars:
        rel = tar_path.relative_to(root).as_posix()
        key, group = None, {}
        try:
            with tarfile.open(tar_path, "r|*") as tf:  # streaming: shards can be large
                for m in tf:
                    if not m.isfile():
                        continue
                    k, ext = _key_ext(m.name)
                    if k != key and group:
                        yield f"{rel}/{key}", group
                        group = {}
                    key, group[ext] = k, tf.extractfile(m).read()
        except (tarfile.TarError, OSError, EOFError) as e:
            bad.append((rel, f"{type(e).__name__}: {e}"))
        if group:
            yield f"{rel}/{key}", group


def from_img2dataset(in_dir: str | Path, out_dir: str | Path, prefix: str = "train", samples_per_shard: int = 1000,
                     compress: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                     extras: dict[str, Any] | None = None, verbose: bool = True) -> dict[str, Any]:
    """Re-shard img2dataset output, validating every sample.

    Accepts the "files" layout (``00000/000000000.jpg|txt|json``) and the "webdataset" layout (``*.tar``,
    also any shards in our own format, whose ``cls`` labels and ``info.json`` classes are carried over).
    Keys are renumbered in sorted source order; json ``source`` names the original file or tar member.
    """
    root = Path(in_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    tars = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith(SHARD_SUFFIXES))
    bad_tars: list[tuple[str, str]] = []
    samples = _iter_tar_layout(tars, root, bad_tars) if tars else _iter_files_layout(root)
    classes = None
    if tars and (root / "info.json").is_file():
        classes = json.loads((root / "info.json").read_text(encoding="utf-8")).get("classes")
    with ShardWriter(out_dir, prefix, samples_per_shard, compress, classes, extras, verbose=verbose) as w:
        for i, (source, files) in enumerate(samples):
            try:
                meta = _json_meta(files.get("json"))
                image_ext = next((e for e in sorted(files) if e in IMAGE_EXTS), None)
                if image_ext is None:
                    raise SkipSample("missing file", "no image")
                caption = files["txt"].decode("utf-8", "replace").strip() if "txt" in files \
                    else str(meta.get("caption") or "").strip()
                if not caption:
                    raise SkipSample("empty caption")
                label = None
                if "cls" in files:
                    cell = files["cls"].decode("ascii", "replace").strip()
                    if not re.fullmatch(r"\d+", cell) or (classes is not None and int(cell) >= len(classes)):
                        raise SkipSample("invalid label", cell)
                    label = int(cell)
                data, ext, wd, ht = check_image(files[image_ext], max_pixels)
            except SkipSample as e:
                w.skip(e.reason, source, e.detail)
                continue
            meta.update(source=f"{source}.{image_ext}", width=wd, height=ht)
            w.write(f"{i:09d}", data, ext, caption, label, meta)
        for rel, detail in bad_tars:
            w.skip("unreadable shard", rel, detail)
    return w.info


def _json_meta(raw: bytes | None) -> dict[str, Any]:
    if raw is None:
        return {}
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}  # metadata is optional: a broken json does not cost the sample
    return meta if isinstance(meta, dict) else {}


# -- shards -> files ------------------------------------------------------------------------------
def extract(shards: str | list[str], out_dir: str | Path, limit: int | None = None,
            verbose: bool = True) -> list[Path]:
    """Write samples of webdataset shards back out as files: ``KEY.<image ext>`` (the stored bytes) and, when
    present, ``KEY.txt`` (the caption), for looking at a data set or feeding the folder commands (``mm caption``,
    ``mm embed``, ``mm zeroshot``). The first ``limit`` samples with an image, in shard order; returns the
    image files written. Keys with ``/`` (img2dataset tars) become ``_``."""
    urls = check_urls(shards, "shards")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for url in urls:
        for sample in iter_shard(url, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)):
            if limit is not None and len(written) >= limit:
                break
            ext = next((e for e in sorted(sample) if e in IMAGE_EXTS), None)
            if ext is None:
                continue
            stem = out / sample["__key__"].replace("/", "_")
            (image := stem.with_name(f"{stem.name}.{ext}")).write_bytes(sample[ext])
            if "txt" in sample:
                stem.with_name(f"{stem.name}.txt").write_bytes(sample["txt"])
            written.append(image)
        if limit is not None and len(written) >= limit:
            break
    if verbose:
        print(f"wrote {len(written)} images (and their captions, where present) to {out}", file=sys.stderr)
    return written
