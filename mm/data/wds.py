"""Webdataset shards -> decoded, tokenized batches, deterministic enough to resume exactly.

Why not webdataset's own pipeline: resuming inside an epoch needs each worker's stream to be a pure
function of (seed, epoch, worker) and a position, and every rejected sample must be counted with its
reason. We use webdataset for what it does well (opening local / ``pipe:`` / http(s) URLs) and
braceexpand for URL lists, and keep the stream logic here:

- each *logical* worker ``g`` of ``world * workers`` reads an infinite sequence of epochs; epoch ``e``
  shuffles the shard list with seed (seed, e) and takes every ``total``-th shard from position ``g``
  (or, with fewer shards than workers, every ``total``-th sample, so no worker ever starves);
- raw samples (still bytes) pass a seeded shuffle buffer, so replaying a prefix costs reading, not
  decoding; a sample's augmentation RNG is derived from its (epoch, worker, position);
- every batch carries its worker's position after it; the trainer keeps the positions of the batches it
  has *consumed* and, on resume, each worker replays its stream up to that position. DataLoader hands out
  batches round-robin over workers, so the resumed loader rotates logical worker ids by the number of
  batches already consumed to continue the exact order.
"""
from __future__ import annotations

import random
import tarfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError
from .decode import BadSample, SampleDecoder
from .gpu import PendingImages
from .naflex import TokenBudget
from .transforms import NaFlexImage, stack_images


def expand_urls(spec: str | list[str]) -> list[str]:
    """``"a-{000..009}.tar::b.tar"`` -> the list of shard URLs (brace expansion, ``::`` joins)."""
    from braceexpand import braceexpand

    parts = spec if isinstance(spec, list) else str(spec).split("::")
    return [u for p in parts if p.strip() for u in braceexpand(p.strip())]


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url) or url.startswith("file://")


SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def is_shard_spec(spec: str) -> bool:
    """Whether a command-line input names webdataset shards (brace ranges, ``::`` lists, ``pipe:`` and URLs
    included) rather than an image file or a folder: every URL it expands to is remote or a tar file."""
    return all(not is_local(u) or u.lower().endswith(SHARD_SUFFIXES) for u in expand_urls(spec))


def check_urls(spec: str | list[str] | None, key: str) -> list[str]:
    """Expand and check that local shard files exist; errors name the config key and the first missing file."""
    if not spec:
        return []
    urls = expand_urls(spec)
    if not urls:
        raise ConfigError(f"{key}: {spec!r} expands to no shard")
    missing = [u.removeprefix("file://") for u in urls if is_local(u) and not Path(u.removeprefix("file://")).is_file()]
    if missing:
        raise ConfigError(f"{key}: shard {missing[0]!r} not found ({len(missing)} of {len(urls)} shards "
                          f"in {spec!r} missing)")
    return urls


def read_keys(path: str | Path, key: str) -> frozenset[str]:
    """The sample keys of a keep list (one a line, blank lines ignored: ``mm curate filter``'s keep.txt); errors
    name the config key (``key``) and say what is wrong with the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{key}: file {str(path)!r} not found (a list of sample keys, one a line)")
    try:
        keys = frozenset(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    except UnicodeDecodeError as e:
        raise ConfigError(f"{key}: {path} is not UTF-8 text ({e})") from None
    if not keys:
        raise ConfigError(f"{key}: {path} lists no sample key")
    return keys


def member_key(name: str) -> tuple[str, str] | None:
    """(sample key, extension) of a tar member's name, as webdataset groups members: the path up to the first dot
    of the base name; None for a name without one (or a hidden file), which is no sample's member."""
    d, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return None
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext


def shard_keys(url: str) -> list[str] | None:
    """The sample keys of a local shard in order, grouped as :func:`iter_shard` groups members, read from the tar
    headers (a plain .tar: no member's data is read); None for a remote URL or an unreadable file."""
    if not is_local(url):
        return None
    keys: list[str] = []
    try:
        with tarfile.open(url.removeprefix("file://"), "r:*") as tar:
            for m in tar:
                split = member_key(m.name) if m.isfile() else None
                if split is not None and (not keys or keys[-1] != split[0]):
                    keys.append(split[0])
    except (tarfile.TarError, OSError, EOFError):
        return None
    return keys


def _open(url: str):
    if is_local(url):
        return open(url.removeprefix("file://"), "rb")
    import webdataset

    return webdataset.gopen(url, "rb")


def iter_shard(url: str, warn: Callable[[str], None]) -> Iterator[dict[str, Any]]:
    """Samples of one tar (``.tar`` / ``.tar.gz``, streamed): {"__key__", "__url__", ext: bytes}.

    A shard cut off mid-file yields what was complete and warns, naming the shard: only the remainder
    is lost. Members are grouped by key = the basename up to its first dot (webdataset's convention).
    """
    sample: dict[str, Any] | None = None
    count = 0
    try:
        with _open(url) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                split = member_key(member.name)
                if split is None:
                    continue
                key, ext = split
                if sample is not None and sample["__key__"] != key:
                    yield sample  # complete: the next sample's header has been read
                    count += 1
                    sample = None
                if sample is None:
                    sample = {"__key__": key, "__url__": url}
                sample[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        warn(f"shard {url} is cut off or unreadable after {count} samples ({type(e).__name__}: {e}); "
             "the rest of this shard is skipped")
        return  # the partially read last sample is dropped with the rest
    if sample is not None:
        yield sample


def _seeded(*parts: int) -> random.Random:
    return random.Random(hash(tuple(parts)) & 0xFFFFFFFFFFFF)  # tuple hash of ints is stable across runs


class ShardStream(IterableDataset):
    """Infinite (train) or single-pass (eval) stream of collated batches; see the module docstring.

    ``start``: {global worker id: (epoch, position)} from a checkpoint; ``rotation``: batches already
    consumed by this process, modulo the number of workers. ``max_samples`` (eval) caps the total,
    split evenly over all workers of all processes.
    """

    def __init__(
        self,
        urls: list[str],
        decoder: SampleDecoder,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        *,
        seed: int = 0,
        shuffle_buffer: int = 0,
        train: bool = True,
        resampled: bool = False,
        rank: int = 0,
        world: int = 1,
        start: dict[int, tuple[int, int]] | None = None,
        rotation: int = 0,
        max_samples: int | None = None,
        budget: TokenBudget | None = None,
        first_batch: int = 0,
        keep: frozenset[str] | None = None,
    ):
        self.urls, self.decoder, self.collate = urls, decoder, collate
        # data.keep: only samples whose key is listed exist for this stream (a curated subset of the shards, read
        # without rewriting them); the others are not read as samples at all, so positions count kept samples only
        self.keep = keep
        # NaFlex training: each batch's size and sequence length from the token budget, by the batch's index in
        # this process's stream (``first_batch``: the batches consumed before a resume)
        self.budget, self.first_batch = budget, first_batch
        self.batch_size, self.seed, self.buffer = batch_size, seed, shuffle_buffer
        self.train, self.resampled = train, resampled
        self.rank, self.world = rank, world
        self.start, self.rotation = dict(start or {}), rotation
        self.max_samples = max_samples

    # -- raw stream ------------------------------------------------------------------------------
    def _shard(self, url: str, warn) -> Iterator[dict[str, Any]]:
        samples = iter_shard(url, warn)
        return samples if self.keep is None else (s for s in samples if s["__key__"] in self.keep)

    def _raw(self, epoch: int, gid: int, total: int, warn) -> Iterator[dict[str, Any]]:
        if self.resampled:  # shards drawn with replacement, forever
            rng = _seeded(self.seed, gid, 7919)
            while True:
                yield from self._shard(rng.choice(self.urls), warn)
        urls = list(self.urls)
        if self.train:
            _seeded(self.seed, epoch).shuffle(urls)
        if len(urls) >= total:
            for u in urls[gid::total]:
                yield from self._shard(u, warn)
        else:  # fewer shards than workers: split by sample so that every worker gets data
            i = 0
            for u in urls:
                for s in self._shard(u, warn):
                    if i % total == gid:
                        yield s
                    i += 1

    def _shuffled(self, raw: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        if not self.train or self.buffer <= 1:
            yield from raw
            return
        buf: list[dict[str, Any]] = []
        for s in raw:
            if len(buf) < self.buffer:
                buf.append(s)
                continue
            i = rng.randrange(len(buf))
            buf[i], s = s, buf[i]
            yield s
        rng.shuffle(buf)
        yield from buf

    # -- batches ---------------------------------------------------------------------------------
    def _plan(self, index: int) -> int:
        """The size of batch ``index``; with a token budget, the decoder is set to its sequence length."""
        if self.budget is None:
            return self.batch_size
        size, seq_len = self.budget.at(index)
        self.decoder.set_seq_len(seq_len)
        return size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        logical = (wid + self.rotation) % nw
        gid, total = self.rank * nw + logical, self.world * nw
        # eval cap: split evenly over all workers of all processes
        limit = -(-self.max_samples // total) if self.max_samples else None
        warnings: list[str] = []
        epoch, skip = self.start.get(gid, (0, 0))
        batch: list[dict[str, Any]] = []
        skipped: Counter[str] = Counter()
        bad: list[str] = []
        parts: list[str] = []  # parts of samples left out (the samples themselves kept): "URL:KEY: why"
        emitted = 0
        # this worker makes every nw-th batch of the process's stream, starting with the first one at its turn
        index = self.first_batch + (logical - self.first_batch) % nw
        batch_size = self._plan(index)
        while True:
            good_in_epoch, pos, resumed = 0, 0, skip > 0
            stream = self._shuffled(self._raw(epoch, gid, total, warnings.append), _seeded(self.seed, epoch, gid))
            for raw in stream:
                pos += 1
                if pos <= skip:
                    continue  # replaying up to the resume position: no decoding
                try:
                    rng = _seeded(self.seed, epoch, gid, pos) if self.train else None
                    item = self.decoder(raw, rng)
                except BadSample as e:
                    skipped[e.reason] += 1
                    bad.append(f"{raw['__url__']}:{raw['__key__']}: {e}")
                    continue
                for problem in item.pop("__problems__", ()):  # a bad part (a region) left out, the sample kept
                    skipped[problem[0]] += 1
                    parts.append(f"{raw['__url__']}:{raw['__key__']}: {problem[1]}")
                item["__key__"] = raw["__key__"]
                batch.append(item)
                good_in_epoch += 1
                if len(batch) == batch_size or (limit and emitted + len(batch) >= limit):
                    out = self.collate(batch)
                    out["meta"] = {"worker": gid, "epoch": epoch, "pos": pos, "skipped": dict(skipped),
                                   "bad": bad, "bad_parts": parts, "warnings": warnings[:], "index": index}
                    emitted += len(batch)
                    batch, skipped, bad, parts = [], Counter(), [], []
                    warnings.clear()  # the list object is shared with the shard readers
                    index += nw
                    batch_size = self._plan(index)
                    yield out
                    if limit and emitted >= limit:
                        return
            skip = 0
            if not self.train:
                break
            if resumed:
                pass  # resumed at (or near) the end of an epoch: an empty remainder is expected
            elif good_in_epoch == 0 and pos <= 0:
                listed = f" whose key is in the keep list ({len(self.keep)} keys)" if self.keep is not None else ""
                raise RuntimeError(f"worker {gid}: shards yielded no samples{listed} at all ({len(self.urls)} shards, "
                                   f"first {self.urls[0]}); warnings: {warnings[:3]}")
            elif good_in_epoch == 0 and not batch:
                raise RuntimeError(f"worker {gid}: a whole pass over its shards produced no usable sample; "
                                   f"reasons: {dict(skipped)}; e.g. {bad[:3]}")
            epoch += 1
        # eval: the last partial batch; with none left, a batch of only "meta" still reports the samples
        # skipped since the last full batch (they must be counted, never lost)
        if batch or skipped or warnings:
            out = self.collate(batch) if batch else {}
            out["meta"] = {"worker": gid, "epoch": epoch, "pos": pos, "skipped": dict(skipped), "bad": bad,
                           "bad_parts": parts, "warnings": warnings}
            yield out


class Collate:
    """Stack images, tokenize captions in the worker (keeps the main process free), pass labels/captions."""

    def __init__(self, tokenizer=None):
        self.tokenizer = tokenizer

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        images = [it["image"] for it in items]
        if all(isinstance(x, (torch.Tensor, NaFlexImage)) for x in images):
            stacked: Any = stack_images(images)
        else:  # data.decode: device -- some images are still compressed
            stacked = PendingImages.collate(images)
        out: dict[str, Any] = {"images": stacked, "keys": [it["__key__"] for it in items]}
        if "text" in items[0]:
            out["texts"] = [it["text"] for it in items]
            if self.tokenizer is not None:
                out["tokens"] = self.tokenizer(out["texts"])
        if "label" in items[0]:
            out["labels"] = torch.tensor([it["label"] for it in items], dtype=torch.long)
        if "captions" in items[0]:
            out["captions"] = [it["captions"] for it in items]
        if "info" in items[0]:
            out["infos"] = [it["info"] for it in items]
        for k, v in items[0].items():  # further per-sample tensors (mm.data.views: local crops, masks, sequences)
            if k not in ("image", "label") and isinstance(v, torch.Tensor):
                out[k] = torch.stack([it[k] for it in items])
        return out


def make_loader(stream: ShardStream, workers: int, prefetch_factor: int = 4, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over a stream that already yields batches (``batch_size=None``)."""
    kw: dict[str, Any] = {}
    if workers > 0:
        # batches come back in worker round-robin order (DataLoader's default in-order mode), which the
        # resume logic relies on
        kw = dict(num_workers=workers, prefetch_factor=prefetch_factor)
    return DataLoader(stream, batch_size=None, pin_memory=pin_memory, **kw)
