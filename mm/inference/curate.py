"""Curating image-text data before training (``mm curate``): score every sample with a reference model and write
the kept samples again (or train on them through ``data.keep``); the filter rules between the two live in
:mod:`mm.inference.curate_rules`.

**Scoring** (:func:`run_score`) is ``mm embed`` over shards with both towers: the same planning (each shard one
chunk, chunk ``c`` on rank ``c % world`` under ``accelerate launch``), DataLoader workers that decode, preprocess and
tokenize, the same part files, skip log, plan check and weights fingerprint (:mod:`mm.inference.embed`). Output::

    plan.json            what was asked; a rerun into the directory must ask the same (it then resumes)
    images/              an ``mm embed`` output of the samples' images (ids: sample keys): ``mm search`` and
                         ``mm index build`` take it as it is
    texts/               an ``mm embed`` output of their captions, row for row with images/ (ids ``KEY#0: caption``,
                         the ids of a caption datastore, ``mm embed --texts SHARDS``)
    meta/part-RRR-CCCCCC.npy    shard C's CLIP scores (image-caption cosine, float32, from fp32 unit embeddings)
    meta/part-RRR-CCCCCC.json   its samples' shard url, keys, captions, image widths and heights; written last,
                                so it marks a finished shard (a rerun skips those and redoes the rest)
    skipped.txt          every sample left out, ``URL:KEY<TAB>reason`` (undecodable image, no caption, ...)
    scores.json          written when every shard is done: the parts in shard order, counts, model, fingerprint

Memory holds one shard's embeddings per worker in flight, whatever the pool's size.

**Writing** (:func:`write_kept`): the kept samples of shards, resharded with balanced shard sizes, every member's
bytes as they were (:class:`mm.data.shards.ShardWriter`).
"""
from __future__ import annotations

import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError
from ..data.decode import IMAGE_KEYS, BadSample, SampleDecoder
from ..data.shards import ShardWriter
from ..data.transforms import image_transform, stack_images
from ..data.wds import check_urls, is_shard_spec, iter_shard, read_keys, shard_keys
from ..utils import dist
from ..utils.host import default_workers
from ..utils.io import atomic_write, write_json_atomic
from ..utils.progress import Progress
from .embed import (
    PLAN_NAME,
    SKIPPED_NAME,
    Chunk,
    embed_batch,
    image_sources,
    load_tokenizer,
    make_plan,
    model_fingerprint,
    part_name,
    recorded_spec,
    write_index,
    write_part,
)

SCORES_NAME, IMAGES, TEXTS, META = "scores.json", "images", "texts", "meta"
_META_RE = re.compile(r"^part-(\d{3,})-(\d{6,})\.json$")


class CurateError(ValueError):
    """A problem with what was asked (inputs, recipe, output directory), found before the work starts."""


# -- scoring: planning and checks ---------------------------------------------------------------------
def plan_pool(data: str, what: str = "data") -> list[Chunk]:
    """One chunk per webdataset shard of ``data`` (brace ranges, ``::`` lists, URLs), in sorted order, as
    ``mm embed`` cuts shards. ``what``: the caller's name for ``data`` in messages."""
    if not is_shard_spec(str(data)):
        raise CurateError(f"{what}: {data!r} names no webdataset shards (.tar / .tar.gz files, brace ranges, URLs): "
                          "a sample's caption is its txt member")
    try:
        urls = check_urls(str(data), what)
    except ConfigError as e:
        raise CurateError(str(e)) from None
    return [Chunk(i, "shard", url=u) for i, u in enumerate(sorted(set(urls)))]


def score_plan(chunks: list[Chunk], *, model_spec: str | None, pretrained: str | None = None,
               adapter: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """What a scoring run is (plan.json): the shards and the model; a rerun must ask the same."""
    plan = make_plan("curate-scores", chunks, model=recorded_spec(model_spec), pretrained=recorded_spec(pretrained),
                     normalize=True, dtype=dtype)
    return {**plan, "adapter": recorded_spec(adapter)}


def check_score_dir(out_dir: str | Path, plan: dict[str, Any], write: bool = False) -> None:
    """CurateError if ``out_dir`` holds another scoring run (other shards, model or dtype); with ``write``, records
    ``plan`` there. A command calls it (write=False) before loading the model."""
    out = Path(out_dir)
    path = out / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in plan if old.get(k) != plan[k]]
        if diff:
            raise CurateError(f"{out} holds a scoring run with different {', '.join(diff)} (was "
                              f"{', '.join(repr(old.get(k)) for k in diff)}); use a new output directory, or the same "
                              "shards and model to resume it")
    elif out.is_dir() and any(out.iterdir()):
        raise CurateError(f"{out} is not empty and holds no scoring run: use a new output directory")
    elif write:
        for d in (out / IMAGES, out / TEXTS, out / META):
            d.mkdir(parents=True, exist_ok=True)
        for kind in ("images", "texts"):  # images/ and texts/ are embed outputs: their own plan.json, as mm embed's
            write_json_atomic(out / kind / PLAN_NAME, {**plan, "kind": kind})
        write_json_atomic(path, plan)


# -- scoring: workers ---------------------------------------------------------------------------------
class _PairDecoder(SampleDecoder):
    """Image tensor, caption and the decoded image's size (upright, before any resizing)."""

    def image_fields(self, img: Any, out: dict[str, Any], rng: Any) -> dict[str, Any]:
        return {"image": self.transform(img, rng), "size": img.size}


class _PairStream(IterableDataset):
    """Worker ``w`` of ``W`` reads shards ``w, w + W, ...`` and yields batch dicts of decoded images, tokens,
    captions and sizes; each carries its chunk, its number in the chunk and whether it is the chunk's last."""

    def __init__(self, chunks: list[Chunk], transform: Callable, tokenizer: Callable, batch_size: int):
        self.chunks, self.tokenizer, self.batch_size = chunks, tokenizer, batch_size
        self.decoder = _PairDecoder(transform, image_keys=IMAGE_KEYS, need=("text",))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for chunk in self.chunks[wid::nw]:
            yield from self._shard(chunk)

    def _batch(self, chunk: Chunk, n: int, last: bool, items: list[tuple[str, dict[str, Any]]],
               skipped: list[tuple[str, str]]) -> dict[str, Any]:
        caps = [it["text"] for _, it in items]
        return {"chunk": chunk.index, "batch": n, "last": last, "ids": [k for k, _ in items],
                "x": stack_images([it["image"] for _, it in items]) if items else None,
                "tokens": self.tokenizer(caps) if items else None, "captions": caps,
                "sizes": [it["size"] for _, it in items], "skipped": skipped}

    def _shard(self, chunk: Chunk) -> Iterator[dict[str, Any]]:
        warnings: list[str] = []
        items, skipped, n = [], [], 0
        for sample in iter_shard(chunk.url, warnings.append):
            try:
                items.append((sample["__key__"], self.decoder(sample)))
            except BadSample as e:
                skipped.append((f"{chunk.url}:{sample['__key__']}", str(e)))
            if len(items) == self.batch_size:
                yield self._batch(chunk, n, False, items, skipped)
                items, skipped, n = [], [], n + 1
        skipped += [(chunk.url, w) for w in warnings]  # a shard cut off mid-file: its remainder is lost
        yield self._batch(chunk, n, True, items, skipped)


# -- scoring: output files ----------------------------------------------------------------------------
def finished_chunks(out_dir: str | Path) -> dict[int, str]:
    """{chunk: part stem} of the shards whose scores, image and text parts are all on disk."""
    out = Path(out_dir)
    meta = out / META
    done: dict[int, str] = {}
    for name in sorted(os.listdir(meta)) if meta.is_dir() else []:
        m = _META_RE.match(name)
        stem = name[:-5]
        if m and all((out / sub / f"{stem}.npy").is_file() for sub in (IMAGES, TEXTS)):
            done.setdefault(int(m.group(2)), stem)
    return done


def _write_pair_chunk(out: Path, rank: int, chunk: Chunk, parts: list[tuple], dtype: str) -> None:
    """One shard's rows: image and text parts (embed's format), then its scores and, last, its meta file."""
    stem = part_name(rank, chunk.index)
    for sub in (IMAGES, TEXTS, META):  # parts of this chunk left by another rank count of an interrupted run
        for p in (out / sub).glob(f"part-*-{chunk.index:06d}.*"):
            if not p.name.startswith(f"{stem}."):
                p.unlink()
    keys = [k for p in parts for k in p[0]]
    img, txt = np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])
    caps = [c for p in parts for c in p[3]]
    sizes = [s for p in parts for s in p[4]]
    skipped = [s for p in parts for s in p[5]]
    write_part(out / IMAGES, rank, chunk.index, keys, img, skipped, dtype)
    write_part(out / TEXTS, rank, chunk.index, [f"{k}#0: {c}" for k, c in zip(keys, caps)], txt, skipped, dtype)
    scores = (img * txt).sum(axis=1, dtype=np.float32)  # both unit rows in fp32: the cosine
    atomic_write(out / META / f"{stem}.npy", lambda f: np.save(f, scores), mode="wb")
    write_json_atomic(out / META / f"{stem}.json", {"url": chunk.url, "keys": keys, "captions": caps,
                                                    "width": [w for w, _ in sizes], "height": [h for _, h in sizes],
                                                    "skipped": skipped}, indent=None)


def _write_scores(out: Path, plan: dict[str, Any], chunks: list[Chunk], fingerprint: str, embed_dim: int) -> None:
    done = finished_chunks(out)
    missing = [c.index for c in chunks if c.index not in done]
    if missing:
        raise RuntimeError(f"{out}: shard {chunks[missing[0]].url} has no scores after all ranks finished")
    extra = {"sources": image_sources(chunks), "model_fingerprint": fingerprint}
    for kind in (IMAGES, TEXTS):
        write_index(out / kind, {**plan, "kind": kind, **extra}, embed_dim)
    parts, skipped, seen, repeated = [], [], set(), []
    for c in chunks:
        meta = json.loads((out / META / f"{done[c.index]}.json").read_text())
        parts.append({"meta": f"{META}/{done[c.index]}.json", "scores": f"{META}/{done[c.index]}.npy",
                      "rows": len(meta["keys"]), "url": c.url})
        skipped += meta["skipped"]
        repeated += [k for k in meta["keys"] if k in seen]
        seen.update(meta["keys"])
    atomic_write(out / SKIPPED_NAME, lambda f: f.writelines(f"{name}\t{why}\n" for name, why in skipped))
    write_json_atomic(out / SCORES_NAME, {
        "format": "mm-curate-scores", "version": 1, **plan, **extra, "embed_dim": embed_dim,
        "count": sum(p["rows"] for p in parts), "skipped": len(skipped), "repeated_keys": len(repeated),
        "repeated_key_example": repeated[0] if repeated else None, "images": IMAGES, "texts": TEXTS, "parts": parts})


def _progress(chunks: list[Chunk], show: bool) -> tuple[Progress, bool]:
    """A progress in samples when the shards are local plain tars (counted from their headers), else in shards."""
    counts = [shard_keys(c.url) if c.url.endswith(".tar") else None for c in chunks] if show else [None]
    if all(k is not None for k in counts):
        return Progress(sum(len(k) for k in counts), "sample", enabled=show, every=10.0), True
    return Progress(len(chunks), "shard", enabled=show, every=10.0), False


# -- scoring: the run ---------------------------------------------------------------------------------
def run_score(model: torch.nn.Module, chunks: list[Chunk], out_dir: str | Path, *, model_spec: str | None = None,
              pretrained: str | None = None, adapter: str | None = None, batch_size: int = 64,
              workers: int | None = None, precision: str | None = None, dtype: str = "float32") -> dict[str, Any]:
    """Score every sample of the planned shards (:func:`plan_pool`) into ``out_dir`` (this rank's unfinished
    shards), then, after all ranks are done, write the indexes on the main process; returns scores.json.
    ``model_spec`` / ``pretrained`` / ``adapter``: what the outputs record as the model (``mm search`` loads it
    for queries). ``precision``: "bf16" or "fp32" (default: bf16 on CUDA, fp32 on CPU); ``dtype``: stored
    embeddings, "float32" or "float16" (scores are float32 either way). ``workers``: processes decoding
    images (None: the available cores but one)."""
    workers = default_workers() if workers is None else workers
    if batch_size < 1:
        raise CurateError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ("float32", "float16"):
        raise CurateError(f"dtype must be float32 or float16, got {dtype!r}")
    dist.start()
    out = Path(out_dir)
    plan = score_plan(chunks, model_spec=model_spec, pretrained=pretrained, adapter=adapter, dtype=dtype)
    fingerprint = model_fingerprint(model)
    tokenizer = load_tokenizer(model)  # fails here, in one line, rather than inside every worker
    if dist.is_main():
        check_score_dir(out, plan, write=True)
    dist.barrier()
    model.eval()
    precision = precision or ("bf16" if next(model.parameters()).is_cuda else "fp32")
    done = finished_chunks(out)
    todo = [c for c in chunks if c.index % dist.world_size() == dist.rank() and c.index not in done]
    if dist.is_main() and done:
        print(f"resuming: {len(done)} of {len(chunks)} shards already scored in {out}", file=sys.stderr)
    if todo:
        _score_chunks(model, todo, out, dist.rank(), tokenizer, batch_size=batch_size, workers=workers,
                      precision=precision, dtype=dtype, show=dist.is_main())
    dist.barrier()
    if dist.is_main():
        _write_scores(out, plan, chunks, fingerprint, model.config.embed_dim)
    dist.barrier()
    return read_scores(out)


def _score_chunks(model: torch.nn.Module, chunks: list[Chunk], out: Path, rank: int, tokenizer: Callable, *,
                  batch_size: int, workers: int, precision: str, dtype: str, show: bool) -> None:
    stream = _PairStream(chunks, image_transform(model), tokenizer, batch_size)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=next(model.parameters()).is_cuda,
                        prefetch_factor=4 if workers else None)
    progress, per_sample = _progress(chunks, show)
    by_index = {c.index: c for c in chunks}
    got: dict[int, dict[int, tuple]] = defaultdict(dict)
    n_batches: dict[int, int] = {}
    empty = np.zeros((0, model.config.embed_dim), np.float32)
    for b in loader:
        c = b["chunk"]
        img = empty if b["x"] is None else embed_batch(model, b["x"], "images", True, precision)
        txt = empty if b["tokens"] is None else embed_batch(model, b["tokens"], "texts", True, precision)
        got[c][b["batch"]] = (b["ids"], img, txt, b["captions"], [tuple(s) for s in b["sizes"]],
                              [tuple(s) for s in b["skipped"]])
        if b["last"]:
            n_batches[c] = b["batch"] + 1
        if per_sample:
            progress.update(len(b["ids"]) + len(b["skipped"]))
        if len(got[c]) == n_batches.get(c):
            parts = [got[c].pop(i) for i in range(n_batches.pop(c))]
            del got[c]
            _write_pair_chunk(out, rank, by_index[c], parts, dtype)
            if not per_sample:
                progress.update(1)
    progress.close()


def read_scores(scores_dir: str | Path) -> dict[str, Any]:
    """The parsed scores.json of a scoring output directory."""
    path = Path(scores_dir) / SCORES_NAME
    if not path.is_file():
        raise CurateError(f"{path}: missing; {scores_dir} is not a finished scoring run (rerun the scoring command "
                          "that made it to finish it)")
    return json.loads(path.read_text())


# -- writing the kept samples -------------------------------------------------------------------------
def balanced_sizes(total: int, most: int) -> list[int]:
    """Shard sizes for ``total`` samples, at most ``most`` a shard, as few shards as that allows, sizes differing
    by at most one (larger first)."""
    n = -(-total // most) if total else 0
    base, extra = divmod(total, n) if n else (0, 0)
    return [base + 1] * extra + [base] * (n - extra)


def _kept_counts(urls: list[str], keep: frozenset[str], names: dict[str, str]) -> tuple[list[int], int]:
    """How many kept samples each shard holds (tar headers of local shards; remote ones are read), checking that
    the kept keys increase through the shards, as the shard writer needs."""
    counts, last, found = [], None, set()
    for url in urls:
        keys = shard_keys(url)
        keys = keys if keys is not None else [s["__key__"] for s in iter_shard(url, lambda m: None)]
        kept = [k for k in keys if k in keep]
        for k in kept:
            if "/" in k:
                raise CurateError(f"{names['data']}: {url} holds a sample in a folder ({k!r}); the shard writer "
                                  "takes plain keys")
            if last is not None and k <= last:
                raise CurateError(f"{names['data']}: kept sample keys must increase through the shards (in the "
                                  f"order given) to be written as sorted shards: {k!r} in {url} comes after "
                                  f"{last!r}")
            last = k
        found.update(kept)
        counts.append(len(kept))
    return counts, len(keep - found)


def write_kept(data: str, keep: str | Path, out_dir: str | Path, *, samples_per_shard: int = 1000,
               prefix: str = "train", compress: bool = False, names: dict[str, str] | None = None,
               show: bool = True) -> dict[str, Any]:
    """Copy the samples of ``data`` (shards) whose key ``keep`` lists into new shards ``out_dir/PREFIX-NNNNNN.tar``
    (``.tar.gz`` with ``compress``), in input order, shard sizes balanced (at most ``samples_per_shard``), every
    member's bytes unchanged (a ``.jpeg`` member is named ``.jpg``, the writer's convention, unless the sample
    has another member to lead with). Returns info.json (``keep_missing``: listed keys found in no shard).
    ``names``: the caller's names for ``data`` and ``keep`` in messages."""
    names = {"data": "data", "keep": "keep", **(names or {})}
    if samples_per_shard < 1:
        raise CurateError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    try:
        urls = check_urls(str(data), names["data"])
        keys = read_keys(keep, names["keep"])
    except ConfigError as e:
        raise CurateError(str(e)) from None
    counts, missing = _kept_counts(urls, keys, names)
    total = sum(counts)
    if total == 0:
        raise CurateError(f"{names['keep']}: none of its {len(keys)} keys is a sample of {data}")
    sizes = balanced_sizes(total, samples_per_shard)
    progress = Progress(total, "sample", enabled=show, every=10.0)
    extras = {"source": str(data), "keep": str(Path(keep).resolve()), "keep_missing": missing}
    with ShardWriter(out_dir, prefix, samples_per_shard=sizes[0], compress=compress, extras=extras,
                     verbose=False) as writer:
        for url, n in zip(urls, counts):
            if not n:
                continue
            for sample in iter_shard(url, lambda msg: None):
                if sample["__key__"] not in keys:
                    continue
                members = {k: v for k, v in sample.items() if not k.startswith("__")}
                # the writer names its leading member's "jpeg" "jpg": lead with another member when there is one
                lead = min((k for k in members if k != "jpeg"), default="jpeg")
                writer.samples_per_shard = sizes[len(writer.shards)]
                writer.write(sample["__key__"], members.pop(lead), lead, extra_members=members)
                progress.update(1)
        info = writer.close()
    progress.close()
    return info
