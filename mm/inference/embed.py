"""Embeddings of many images or texts, written to disk in resumable chunks (``mm embed``).

The inputs are cut into chunks before any work starts: image files (folders searched recursively) sorted
by id and cut every ``chunk_size``; each webdataset shard is one chunk (its size is unknown until it is
read); texts in file order, cut every ``chunk_size``. The cut is a pure function of the inputs and the
chunk size, so a rerun of the same command finds the same chunks, skips those already on disk and does
the rest. Under ``accelerate launch`` chunk ``c`` belongs to rank ``c % world``. Output directory::

    plan.json                 what was asked; a rerun into the same directory must ask the same
    part-RRR-CCCCCC.npy       chunk C's rows [n, embed_dim] (float32 or float16), written by rank R
    part-RRR-CCCCCC.ids.json  {"ids": [...], "skipped": [[input, reason], ...]} for that chunk
    skipped.txt               every unreadable input, "input<TAB>reason"
    index.json                the parts in chunk order with row counts, model, embed_dim, normalisation

Ids: image paths relative to the folder given (files given one by one: the path as given), shard sample
keys, or ``"LINE: text"`` for texts. Every file is written under a temporary name and renamed, the ids
before the rows, so an existing ``.npy`` means a finished chunk.

Data flow: DataLoader workers decode and preprocess (or tokenize) whole batches; the main process runs
the model under bf16 autocast on CUDA (fp32 on CPU), L2-normalises in fp32, and writes a chunk when all
of its batches are in. Unreadable images are skipped and listed, never fatal.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..config import ConfigError
from ..data.decode import IMAGE_KEYS, BadSample, SampleDecoder
from ..data.folder import list_images, load_image
from ..data.transforms import image_transform, stack_images
from ..data.wds import check_urls, is_shard_spec, iter_shard
from ..tokenizer import get_tokenizer
from ..utils import dist
from ..utils.host import default_workers
from ..utils.io import atomic_write, write_json_atomic
from ..utils.precision import autocast
from ..utils.progress import Progress
from .quantize import QuantizeError
from .quantize import quantize as quantize_model

INDEX_NAME, PLAN_NAME, SKIPPED_NAME = "index.json", "plan.json", "skipped.txt"
_PART_RE = re.compile(r"^part-(\d{3,})-(\d{6,})\.npy$")


class EmbedError(ValueError):
    """A problem with what was asked (inputs, output directory, options), found before the work starts."""


@dataclass(frozen=True)
class Chunk:
    """One unit of output: ``items`` as (id, image path or text) pairs, or a whole shard ``url``."""

    index: int
    kind: str  # "files", "shard" or "texts"
    items: tuple[tuple[str, str], ...] = ()
    url: str = ""


# -- planning: inputs -> chunks ----------------------------------------------------------------------
def plan_images(inputs: Sequence[str | Path], chunk_size: int, what: str = "inputs") -> list[Chunk]:
    """Chunks over image files, folders and webdataset shards (brace-expanded). Raises EmbedError naming a
    missing input, two inputs with the same id, or an input list with no image; ``what``: the caller's name for
    ``inputs`` in those messages (``mm embed``: ``--images``)."""
    files: dict[str, str] = {}
    urls: set[str] = set()
    for item in map(str, inputs):
        if is_shard_spec(item):
            try:
                urls.update(check_urls(item, what))
            except ConfigError as e:
                raise EmbedError(str(e)) from None
            continue
        try:
            found = list_images([item])
        except FileNotFoundError as e:
            raise EmbedError(str(e)) from None
        root = Path(item)
        for p in found:
            pid = p.relative_to(root).as_posix() if root.is_dir() else p.as_posix()
            if files.setdefault(pid, str(p)) != str(p):
                raise EmbedError(f"two inputs have the id {pid!r} ({files[pid]} and {p}); give their common "
                                 "parent folder instead, so that ids stay unique")
    if not files and not urls:
        raise EmbedError(f"no images found in {', '.join(map(str, inputs))}")
    chunks = _cut("files", sorted(files.items()), chunk_size)
    return chunks + [Chunk(len(chunks) + i, "shard", url=u) for i, u in enumerate(sorted(urls))]


def read_texts(path: str | Path, what: str = "texts") -> list[tuple[str, str]]:
    """(id, text) pairs from a text file (one text a line), a ``.json`` list of strings or a ``.jsonl`` file
    of objects with a ``"text"`` field. Ids are ``"LINE: text"`` (list position for ``.json``); blank texts
    are left out. Raises EmbedError naming the file and line of a malformed entry (a missing file by ``what``, the
    caller's name for it: ``mm embed``'s ``--texts``)."""
    path = Path(path)
    if not path.is_file():
        raise EmbedError(f"{what}: no such file: {path}")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EmbedError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix == ".json":
        try:
            texts = json.loads(raw)
        except json.JSONDecodeError as e:
            raise EmbedError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            raise EmbedError(f"{path}: expected a JSON list of strings")
    elif path.suffix == ".jsonl":
        texts = [_jsonl_text(path, n, line) for n, line in enumerate(raw.splitlines(), 1)]
    else:
        texts = raw.splitlines()
    pairs = [(f"{n}: {t.strip()}", t.strip()) for n, t in enumerate(texts, 1) if t.strip()]
    if not pairs:
        raise EmbedError(f"{path}: no texts")
    return pairs


def _jsonl_text(path: Path, n: int, line: str) -> str:
    if not line.strip():
        return ""
    try:
        text = json.loads(line).get("text")
    except (json.JSONDecodeError, AttributeError):
        raise EmbedError(f"{path}:{n}: expected a JSON object with a \"text\" field") from None
    if not isinstance(text, str):
        raise EmbedError(f"{path}:{n}: \"text\" is missing or not a string")
    return text


def shard_captions(spec: str, what: str = "texts") -> list[tuple[str, str]]:
    """(id, caption) pairs of every caption in webdataset shards: a sample's ``json`` ``captions`` list when it has
    one, else its ``txt``; ids are ``KEY#I: caption`` (I: the caption's position in its sample), so a retrieval
    datastore knows which sample each caption came from (:mod:`mm.inference.retrieval`). Samples without a caption
    are left out; a shard cut off mid-file keeps its complete samples."""
    try:
        urls = check_urls(spec, what)
    except ConfigError as e:
        raise EmbedError(str(e)) from None
    pairs: list[tuple[str, str]] = []
    for url in urls:
        for sample in iter_shard(url, warn=lambda msg: None):
            caps = None
            if "json" in sample:
                try:
                    caps = json.loads(sample["json"].decode("utf-8")).get("captions")
                except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                    caps = None
            if not (isinstance(caps, list) and all(isinstance(c, str) for c in caps)):
                caps = [sample["txt"].decode("utf-8", errors="replace")] if "txt" in sample else []
            pairs += [(f"{sample['__key__']}#{i}: {c.strip()}", c.strip()) for i, c in enumerate(caps) if c.strip()]
    if not pairs:
        raise EmbedError(f"{spec}: no captions in these shards")
    return pairs


def plan_texts(texts: str | Path | Sequence[str], chunk_size: int, what: str = "texts") -> list[Chunk]:
    """Chunks over a texts file (see :func:`read_texts`; ``what`` as there), webdataset shards (their captions,
    :func:`shard_captions`) or a list of strings (ids "POSITION: text")."""
    if isinstance(texts, (str, Path)) and is_shard_spec(str(texts)):
        pairs = shard_captions(str(texts), what)
    else:
        pairs = read_texts(texts, what) if isinstance(texts, (str, Path)) else \
            [(f"{n}: {t.strip()}", t.strip()) for n, t in enumerate(texts, 1) if t.strip()]
    if not pairs:
        raise EmbedError("no texts to embed")
    return _cut("texts", pairs, chunk_size)


def _cut(kind: str, items: list[tuple[str, str]], size: int) -> list[Chunk]:
    if size < 1:
        raise EmbedError(f"chunk_size must be >= 1, got {size}")
    return [Chunk(i, kind, tuple(items[o:o + size])) for i, o in enumerate(range(0, len(items), size))]


# -- workers: chunks -> preprocessed batches ---------------------------------------------------------
@dataclass(frozen=True)
class _Job:
    """What one worker does in one go: a batch of files / texts, or a whole shard (several batches)."""

    chunk: int
    kind: str
    batch: int = 0
    last: bool = True
    items: tuple[tuple[str, str], ...] = ()
    url: str = ""


def _jobs(chunks: list[Chunk], batch_size: int) -> list[_Job]:
    jobs = []
    for c in chunks:
        if c.kind == "shard":
            jobs.append(_Job(c.index, c.kind, url=c.url))
            continue
        starts = range(0, len(c.items), batch_size)
        jobs += [_Job(c.index, c.kind, b, b == len(starts) - 1, c.items[o:o + batch_size])
                 for b, o in enumerate(starts)]
    return jobs


def _batch(job: _Job, n: int, last: bool, ids: list[str], x: torch.Tensor | None,
           skipped: list[tuple[str, str]]) -> dict[str, Any]:
    return {"chunk": job.chunk, "batch": n, "last": last, "ids": ids, "x": x, "skipped": skipped}


class _BatchStream(IterableDataset):
    """Worker ``w`` of ``W`` runs jobs ``w, w + W, ...`` and yields batch dicts (see :func:`_batch`). A
    chunk's batches may arrive out of order across workers; each carries its number and a last flag."""

    def __init__(self, jobs: list[_Job], transform: Callable | None, tokenizer: Callable | None, batch_size: int):
        self.jobs, self.transform, self.tokenizer, self.batch_size = jobs, transform, tokenizer, batch_size

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        for job in self.jobs[wid::nw]:
            if job.kind == "shard":
                yield from self._shard(job)
            elif job.kind == "texts":
                yield _batch(job, job.batch, job.last, [i for i, _ in job.items],
                             self.tokenizer([t for _, t in job.items]), [])
            else:
                yield self._files(job)

    def _files(self, job: _Job) -> dict[str, Any]:
        ids, xs, skipped = [], [], []
        for pid, path in job.items:
            try:
                xs.append(self.transform(load_image(path)))
                ids.append(pid)
            except BadSample as e:
                skipped.append((path, str(e)))
        return _batch(job, job.batch, job.last, ids, stack_images(xs) if xs else None, skipped)

    def _shard(self, job: _Job) -> Iterator[dict[str, Any]]:
        decoder = SampleDecoder(self.transform, image_keys=IMAGE_KEYS, need=())
        warnings: list[str] = []
        ids, xs, skipped, n = [], [], [], 0
        for sample in iter_shard(job.url, warnings.append):
            try:
                xs.append(decoder(sample)["image"])
                ids.append(sample["__key__"])
            except BadSample as e:
                skipped.append((f"{job.url}:{sample['__key__']}", str(e)))
            if len(xs) == self.batch_size:
                yield _batch(job, n, False, ids, stack_images(xs), skipped)
                ids, xs, skipped, n = [], [], [], n + 1
        skipped += [(job.url, w) for w in warnings]  # a shard cut off mid-file: its remainder is lost
        yield _batch(job, n, True, ids, stack_images(xs) if xs else None, skipped)


# -- output files ------------------------------------------------------------------------------------
# Every file is written atomically by its one writer (parts carry their rank, the rest is the main process's).
def part_name(rank: int, chunk: int) -> str:
    """The file stem of chunk ``chunk``'s part written by rank ``rank``: ``part-RRR-CCCCCC``."""
    return f"part-{rank:03d}-{chunk:06d}"


def finished_parts(out: Path) -> dict[int, str]:
    """{chunk: part stem} for chunks whose rows are on disk (the ids file is written before the rows)."""
    found = {}
    for name in sorted(os.listdir(out)) if out.is_dir() else []:
        m = _PART_RE.match(name)
        if m and (out / f"{name[:-4]}.ids.json").is_file():
            found.setdefault(int(m.group(2)), name[:-4])
    return found


def write_part(out: Path, rank: int, chunk: int, ids: list[str], emb: np.ndarray,
               skipped: list[tuple[str, str]], dtype: str) -> None:
    """One chunk's part in ``out``: its ids and skipped samples (``STEM.ids.json``), then its rows (``STEM.npy``)."""
    stem = part_name(rank, chunk)
    write_json_atomic(out / f"{stem}.ids.json", {"ids": ids, "skipped": skipped}, indent=None)
    atomic_write(out / f"{stem}.npy", lambda f: np.save(f, emb.astype(dtype)), mode="wb")


def _check_plan(out: Path, plan: dict[str, Any], write: bool) -> None:
    """A rerun into ``out`` must ask for the same chunks, or old and new parts would not line up."""
    path = out / PLAN_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in plan if old.get(k) != plan[k]]  # (a key older plans lack reads as None)
        if diff:
            raise EmbedError(f"{out} holds an embed run with different {', '.join(diff)} (was "
                             f"{', '.join(repr(old.get(k)) for k in diff)}); use a new output directory, or "
                             "the same inputs and options to resume")
    elif write:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, plan)


def image_sources(chunks: list[Chunk]) -> dict[str, list[str]]:
    """Where the indexed images can be read again (``mm search --plot``), recorded in index.json: the absolute
    folders that file ids are relative to (an id + its root is the file), and absolute shard URLs (ids are
    sample keys). Not part of the plan: moving the inputs does not invalidate finished chunks."""
    roots: set[str] = set()
    shards: list[str] = []
    for c in chunks:
        if c.kind == "shard":
            shards.append(c.url if c.url.startswith("pipe:") or "://" in c.url else os.path.abspath(c.url))
        for pid, path in c.items if c.kind == "files" else ():
            full = Path(os.path.abspath(path)).as_posix()
            if full.endswith(pid):
                roots.add(full[: len(full) - len(pid)])
    return {"roots": sorted(roots), "shards": shards}


def make_plan(kind: str, chunks: list[Chunk], *, model: str | None, pretrained: str | None, normalize: bool,
              dtype: str, quantize: str | None = None, seq_len: int | None = None) -> dict[str, Any]:
    digest = hashlib.sha256(json.dumps([asdict(c) for c in chunks]).encode()).hexdigest()
    # seq_len: NaFlex images (mm search embeds image queries the same way); None: square
    return {"kind": kind, "model": model, "pretrained": pretrained, "normalized": normalize, "dtype": dtype,
            "quantize": quantize, "chunks": len(chunks), "inputs_sha256": digest, "seq_len": seq_len}


FINGERPRINT_SAMPLES = 4096  # values of each tensor a fingerprint reads (evenly spaced): models differ everywhere


def _sample_positions(n: int) -> torch.Tensor:
    """``FINGERPRINT_SAMPLES`` evenly spaced positions in ``range(n)``, the first and the last included. float32
    holds every position below 2**24 exactly (these are the positions every fingerprint so far was made with); above
    it, float32 rounds the last position past the end (a 49,408 x 512 token table: 25,296,895 -> 25,296,896), so
    float64 there."""
    dtype = torch.float32 if n <= 2**24 else torch.float64
    return torch.linspace(0, n - 1, FINGERPRINT_SAMPLES, dtype=dtype).long()


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 of the model's weights as loaded: each state-dict entry's name, shape, dtype and up to
    ``FINGERPRINT_SAMPLES`` of its values, evenly spaced (milliseconds for any model; two different trainings,
    fine-tunes or adapters differ in nearly every tensor, so a sample tells them apart). Index outputs record it
    so queries are embedded by the model that made the index (``mm search``, ``mm serve``)."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if not isinstance(value, torch.Tensor):
            h.update(repr(value).encode())
            continue
        flat = value.detach().reshape(-1)
        if flat.numel() > FINGERPRINT_SAMPLES:
            flat = flat[_sample_positions(flat.numel()).to(flat.device)]
        h.update(f"{tuple(value.shape)} {value.dtype}".encode())
        h.update(flat.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_query_model(index: dict[str, Any], model: torch.nn.Module, spec: str, where: str,
                      allow_other: bool = False, override: str = "allow_other=True") -> None:
    """EmbedError (naming ``where``, the index) unless ``model`` (loaded from ``spec``) is the model the index's
    embeddings were made with: same width, and the same weights fingerprint when the index records one, else
    the same recorded name. ``allow_other``: only the width must match (comparing two models' embeddings);
    ``override``: the caller's name for it, in the message."""
    dim = model.config.embed_dim
    if index["embed_dim"] != dim:
        raise EmbedError(f"{where}: embeddings of width {index['embed_dim']}, the query model's are {dim} (the index "
                         f"was made with another model: {index.get('model')})")
    if allow_other:
        return
    recorded = index.get("model_fingerprint")
    if recorded is not None:
        same = recorded == model_fingerprint(model)
    else:
        same = index.get("model") is None or recorded_spec(spec) == index.get("model")
    if not same:
        raise EmbedError(f"{where}: made with the model {index.get('model')} (weights fingerprint "
                         f"{(recorded or 'not recorded')[:12]}), queries would be embedded by {spec}, whose weights "
                         "differ: their embeddings are not comparable. Query with the index's model, rebuild the "
                         f"index with this one, or pass {override} to compare them anyway")


def read_index(out_dir: str | Path) -> dict[str, Any]:
    """The parsed ``index.json`` of an embed output directory."""
    path = Path(out_dir) / INDEX_NAME
    if not path.is_file():
        raise EmbedError(f"{path}: missing; the embed run did not finish (rerun the same command to complete it)")
    return json.loads(path.read_text())


def load_index(out_dir: str | Path) -> tuple[np.ndarray, list[str]]:
    """All embeddings ([N, embed_dim], the dtype they were stored in) and their ids, in index order."""
    out, index = Path(out_dir), read_index(out_dir)
    arrays = [np.load(out / p["file"]) for p in index["parts"]]
    ids = [i for p in index["parts"] for i in json.loads((out / p["ids"]).read_text())["ids"]]
    emb = np.concatenate(arrays) if arrays else np.zeros((0, index["embed_dim"]), index["dtype"])
    return emb, ids


def write_index(out: Path, plan: dict[str, Any], embed_dim: int) -> None:
    """index.json and skipped.txt of ``out`` once every chunk of ``plan`` has its part (main process, last)."""
    parts, skipped = [], []
    done = finished_parts(out)
    for c in range(plan["chunks"]):
        if c not in done:
            raise RuntimeError(f"{out}: chunk {c} has no part after all ranks finished")
        side = json.loads((out / f"{done[c]}.ids.json").read_text())
        parts.append({"file": f"{done[c]}.npy", "ids": f"{done[c]}.ids.json", "rows": len(side["ids"])})
        skipped += side["skipped"]
    atomic_write(out / SKIPPED_NAME, lambda f: f.writelines(f"{name}\t{why}\n" for name, why in skipped))
    index = {"format": "mm-embed", "version": 1, **plan, "embed_dim": embed_dim,
             "count": sum(p["rows"] for p in parts), "skipped": len(skipped), "parts": parts}
    write_json_atomic(out / INDEX_NAME, index)


# -- the run -----------------------------------------------------------------------------------------
def embed_batch(model: torch.nn.Module, x: torch.Tensor, kind: str, normalize: bool, precision: str) -> np.ndarray:
    """Embeddings of one batch (images, or token ids when ``kind`` is "texts") as float32 rows on the CPU."""
    dev = next(model.parameters()).device
    x = x.to(dev, non_blocking=True)
    with torch.inference_mode(), autocast(dev, precision):
        emb = model.encode_text(x) if kind == "texts" else model.encode_image(x)
    emb = emb.float()  # normalised in fp32: bf16 rows would not have unit norm
    return (F.normalize(emb, dim=-1) if normalize else emb).cpu().numpy()


def recorded_spec(spec: str | None) -> str | None:
    """A model / weights path as index.json records it: absolute, so `mm search` works from anywhere."""
    return str(Path(spec).resolve()) if spec and Path(spec).exists() else spec


def check_out_dir(out_dir: str | Path, chunks: list[Chunk], *, model_spec: str | None = None,
                  pretrained: str | None = None, normalize: bool = True, dtype: str = "float32",
                  quantize: str | None = None, seq_len: int | None = None) -> None:
    """EmbedError if ``out_dir`` holds another embed run (other inputs or options); nothing is written. A
    command calls it before loading the model, so a mismatch costs a second, not a model load."""
    kind = "texts" if chunks and chunks[0].kind == "texts" else "images"
    _check_plan(Path(out_dir), make_plan(kind, chunks, model=recorded_spec(model_spec),
                                         pretrained=recorded_spec(pretrained), normalize=normalize, dtype=dtype,
                                         quantize=quantize, seq_len=seq_len),
                write=False)


def run_embed(model: torch.nn.Module, chunks: list[Chunk], out_dir: str | Path, *, model_spec: str | None = None,
              pretrained: str | None = None, batch_size: int = 64, workers: int | None = None, normalize: bool = True,
              precision: str | None = None, dtype: str = "float32", quantize: str | None = None,
              seq_len: int | None = None) -> dict[str, Any]:
    """Embed the planned ``chunks`` into ``out_dir`` (this rank's unfinished ones), then, after all ranks are
    done, write index.json on the main process. Returns the index. ``model_spec`` / ``pretrained``: what
    index.json records as the model (``mm search`` loads it for queries). ``precision``: "bf16" or "fp32"
    (default: bf16 on CUDA, fp32 on CPU). ``quantize``: "int8" / "int8-weight" (:func:`mm.quantize`, applied to
    a copy unless the model already is). ``workers``: image-loading processes (None: the available cores but
    one, :func:`mm.utils.host.default_workers`). ``seq_len``: NaFlex, each image at its own aspect ratio in at
    most that many patches (recorded in the plan and index). The model is put in eval mode (train-mode patch
    dropout would change the embeddings)."""
    workers = default_workers() if workers is None else workers
    if batch_size < 1:
        raise EmbedError(f"batch_size must be >= 1, got {batch_size}")
    if dtype not in ("float32", "float16"):
        raise EmbedError(f"dtype must be float32 or float16, got {dtype!r}")
    dist.start()  # joins the launcher's process group: chunk c is rank c % world's
    out = Path(out_dir)
    kind = "texts" if chunks and chunks[0].kind == "texts" else "images"
    plan = make_plan(kind, chunks, model=recorded_spec(model_spec), pretrained=recorded_spec(pretrained),
                     normalize=normalize, dtype=dtype, quantize=quantize, seq_len=seq_len)
    fingerprint = model_fingerprint(model)  # of the model as given (a quantised copy below embeds the same model)
    if quantize and getattr(model, "quantization", None) != quantize:
        try:
            model = quantize_model(model, quantize)
        except QuantizeError as e:
            raise EmbedError(f"quantize: {e}") from None
    if kind == "texts":
        load_tokenizer(model)  # fails here, in one line, rather than inside every worker
    _check_plan(out, plan, write=dist.is_main())
    dist.barrier()  # plan.json and the directory exist before any rank lists it
    model.eval()
    precision = precision or ("bf16" if next(model.parameters()).is_cuda else "fp32")
    done = finished_parts(out)
    todo = [c for c in chunks if c.index % dist.world_size() == dist.rank() and c.index not in done]
    if dist.is_main() and done:
        print(f"resuming: {len(done)} of {len(chunks)} chunks already in {out}", file=sys.stderr)
    _embed_chunks(model, todo, out, dist.rank(), batch_size=batch_size, workers=workers,
                  normalize=normalize, precision=precision, dtype=dtype, show=dist.is_main(), seq_len=seq_len)
    dist.barrier()
    if dist.is_main():
        write_index(out, {**plan, "sources": image_sources(chunks), "model_fingerprint": fingerprint},
                    model.config.embed_dim)
    dist.barrier()  # every rank returns the finished index
    return read_index(out)


def load_tokenizer(model: torch.nn.Module) -> Callable[[list[str]], torch.Tensor]:
    """The model's tokenizer, loaded in this process: a Hugging Face tokenizer that cannot be loaded raises
    :class:`~mm.tokenizer.TokenizerUnavailable` here (one line) instead of in each DataLoader worker (whose
    errors reach the main process wrapped in the worker's traceback). Workers load their own copy."""
    tok = get_tokenizer(model)
    if callable(getattr(tok, "load", None)):
        tok.load()
    return tok


def _embed_chunks(model: torch.nn.Module, chunks: list[Chunk], out: Path, rank: int, *, batch_size: int,
                  workers: int, normalize: bool, precision: str, dtype: str, show: bool,
                  seq_len: int | None = None) -> None:
    if not chunks:  # all of this rank's chunks were done by an earlier run
        return
    texts = chunks[0].kind == "texts"
    stream = _BatchStream(_jobs(chunks, batch_size), None if texts else image_transform(model, seq_len=seq_len),
                          get_tokenizer(model) if texts else None, batch_size)
    cuda = next(model.parameters()).is_cuda
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=cuda,
                        prefetch_factor=4 if workers else None)
    known = None if any(c.kind == "shard" for c in chunks) else sum(len(c.items) for c in chunks)
    progress = Progress(known, "text" if texts else "image", enabled=show, every=10.0)
    got: dict[int, dict[int, tuple]] = defaultdict(dict)
    n_batches: dict[int, int] = {}
    empty = np.zeros((0, model.config.embed_dim), np.float32)
    for b in loader:
        c = b["chunk"]
        emb = empty if b["x"] is None else embed_batch(model, b["x"], "texts" if texts else "images", normalize,
                                                       precision)
        got[c][b["batch"]] = (b["ids"], emb, [tuple(s) for s in b["skipped"]])
        if b["last"]:
            n_batches[c] = b["batch"] + 1
        progress.update(len(b["ids"]) + len(b["skipped"]))
        if len(got[c]) == n_batches.get(c):
            parts = [got[c].pop(i) for i in range(n_batches.pop(c))]
            del got[c]
            write_part(out, rank, c, [i for p in parts for i in p[0]], np.concatenate([p[1] for p in parts]),
                       [s for p in parts for s in p[2]], dtype)
    progress.close()


def embed_images(model: torch.nn.Module, inputs: Sequence[str | Path], out_dir: str | Path, *,
                 chunk_size: int = 4096, **kw: Any) -> dict[str, Any]:
    """Embed image files, folders (recursive) and webdataset shards into ``out_dir``; returns the index.
    Keyword arguments as :func:`run_embed` (batch_size, workers, normalize, precision, dtype, model_spec)."""
    return run_embed(model, plan_images(inputs, chunk_size), out_dir, **kw)


def embed_texts(model: torch.nn.Module, texts: str | Path | Sequence[str], out_dir: str | Path, *,
                chunk_size: int = 4096, **kw: Any) -> dict[str, Any]:
    """Embed a texts file (one a line, ``.json`` list or ``.jsonl`` with "text") or a list of strings."""
    return run_embed(model, plan_texts(texts, chunk_size), out_dir, **kw)
