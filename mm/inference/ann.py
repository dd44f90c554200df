"""Approximate nearest-neighbour indexes over an ``mm embed`` output (``mm index build`` / ``tune``, ``mm search
--index`` on such a directory), built with faiss: mm chooses and measures, faiss searches.

``choose_index`` picks the index type and its parameters from the collection's size and a memory budget, with
autofaiss's rules of thumb (our code): a flat scan while it is small, HNSW32 (graph, ~d*4 + 2*32*4 bytes a
vector) up to a million vectors, IVF-Flat (inverted lists of full vectors, 2^round(log2(4 sqrt(n))) lists),
then IVF-PQ (m bytes a vector, the largest m dividing d that fits: more bytes, better recall). IVF-PQ's codes
rank only roughly (recall@10 ~0.7 with 64 bytes), so an IVF-PQ index re-ranks: it asks faiss for ``rerank`` x k
candidates and orders them by their exact cosines, read from the embed output's vectors on disk (memory-mapped:
k x rerank rows a query, ~1 MB at k=10, rerank=10 and 512-d float32), which stays where it is and is not counted
in the memory budget. The index is
trained on a sample, vectors are added chunk by chunk, streamed part by part from the embed output (memory:
one chunk plus the index), and written at checkpoints, so a killed build continues from the last one.

Held-out queries measure recall honestly: rows sampled from the collection and excluded from the training
sample, then perturbed (unit noise of norm ``QUERY_NOISE``, renormalised), so no query is a stored vector. Their
exact top-10 comes from the exact streamed scan (:func:`mm.inference.search.search`). recall@1: the share of
queries whose first result is the exact first; recall@10: the mean overlap of the two top-10 sets / 10.

Output directory::

    index.faiss      the faiss index (rows in the embed output's order: faiss id = global row)
    ids/PART.json    copies of the embed output's ids files (the index answers without the embed output)
    build.json       what is being built (spec, source, rows added); a rerun checks it and continues
    heldout.npy      the held-out queries [Q, d]; truth.npy their exact top-10 rows [Q, 10]
    ann.json         written last: how it was built, the embed output's metadata, recall, search parameters
"""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..utils.io import atomic_path, write_json_atomic
from ..utils.progress import Progress
from .embed import EmbedError, read_index
from .search import _ids, query_matrix, unit_rows

ANN_NAME, BUILD_NAME, INDEX_FILE = "ann.json", "build.json", "index.faiss"
KINDS = ("flat", "hnsw", "ivf-flat", "ivf-pq")
FLAT_MAX = 20_000      # below this many vectors a flat scan is fast enough: exact answers
HNSW_MAX = 1_000_000   # above, HNSW's build (single inserts) takes hours on a few cores
HNSW_M = 32
QUERY_NOISE = 0.3      # norm of the noise added to a held-out vector to make a query
RECALL_K = 10
NLIST_MAX = 4096       # k-means training and assigning n vectors cost n x nlist x d: 4,096 lists keep a 10M-vector
# build within ~15 min on 2 cores (16,384, autofaiss's 4 sqrt(n), would take hours); a query then scans nprobe
# lists of n / 4,096 codes (2,400 at 10M), a fraction of a millisecond a list for PQ codes
PLATEAU, PLATEAU_GAIN = 3, 0.002  # tune stops when 3 doublings of the knob gained at most 0.002 recall@10
RERANK = 10            # IVF-PQ: candidates re-ranked by exact cosine, per result asked for


class AnnError(EmbedError):
    """A problem with what was asked of ``mm index`` (inputs, budget, output directory)."""


@dataclass
class IndexSpec:
    """An index type with its parameters and its estimated memory (bytes)."""

    kind: str
    factory: str
    memory: int
    nlist: int = 0
    m: int = 0
    nbits: int = 0
    hnsw_m: int = 0
    rerank: int = 0  # IVF-PQ: re-rank rerank x k candidates by their exact cosines (0: the codes' order)

    @property
    def train_rows(self) -> int:
        """Vectors to train on: 64 per list (faiss asks for 30-256 and warns below 39; k-means time grows with
        rows x lists, ~2.5 min for 4,096 lists of 512-d on 2 cores); PQ codebooks want >= 256 x 39."""
        if not self.nlist:
            return 0
        return max(64 * self.nlist, 10_000 if self.kind == "ivf-pq" else 0)


def parse_memory(text: str) -> int:
    """``4GB``, ``500MB``, ``1.5G``, ``123456`` (bytes) -> bytes (powers of 1024)."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(float(t))
    except ValueError:
        raise AnnError(f"not a memory size: {text!r} (e.g. 4GB, 500MB)") from None


def nlist_for(n: int) -> int:
    """autofaiss's rule: about 4 sqrt(n) inverted lists, a power of two, at most n / 39 (enough to train) and
    at most ``NLIST_MAX``."""
    nlist = min(2 ** round(math.log2(max(4 * math.sqrt(n), 1))), NLIST_MAX)
    while nlist > 1 and nlist * 39 > n:
        nlist //= 2
    return max(nlist, 1)


def _pq_ms(dim: int) -> list[int]:
    """Sub-quantizer counts for IVF-PQ, largest first: divisors of ``dim`` with >= 4 dimensions each, at most 64
    bytes a vector (faiss's fast PQ scans), down to 4."""
    return [m for m in range(min(64, dim // 4), 3, -1) if dim % m == 0]


def estimate_memory(kind: str, n: int, dim: int, nlist: int = 0, m: int = 0, nbits: int = 8) -> int:
    """Bytes an index of ``n`` vectors holds in memory (autofaiss's estimates: codes + ids + centroids)."""
    if kind == "flat":
        return n * dim * 4
    if kind == "hnsw":
        return n * (dim * 4 + HNSW_M * 2 * 4)
    centroids = nlist * dim * 4
    if kind == "ivf-flat":
        return n * (dim * 4 + 8) + centroids
    return n * (m * nbits // 8 + 8) + centroids + m * (1 << nbits) * (dim // m) * 4


def _spec(kind: str, n: int, dim: int, m: int = 0) -> IndexSpec:
    nlist = nlist_for(n) if kind.startswith("ivf") else 0
    if kind == "flat":
        factory = "Flat"
    elif kind == "hnsw":
        factory = f"HNSW{HNSW_M},Flat"
    elif kind == "ivf-flat":
        factory = f"IVF{nlist},Flat"
    else:
        factory = f"IVF{nlist},PQ{m}x8np"  # np: no polysemous training (minutes, for a Hamming filter we do not use)
    return IndexSpec(kind, factory, estimate_memory(kind, n, dim, nlist, m), nlist=nlist, m=m,
                     nbits=8 if kind == "ivf-pq" else 0, hnsw_m=HNSW_M if kind == "hnsw" else 0,
                     rerank=RERANK if kind == "ivf-pq" else 0)


def candidates(n: int, dim: int, kind: str | None = None) -> list[IndexSpec]:
    """Index specs for ``n`` vectors of width ``dim``, most accurate first (``kind``: only that type)."""
    specs = []
    if n <= FLAT_MAX or kind == "flat":
        specs.append(_spec("flat", n, dim))
    if n <= HNSW_MAX or kind == "hnsw":
        specs.append(_spec("hnsw", n, dim))
    if n >= 39 * 2:  # enough to train two lists
        specs.append(_spec("ivf-flat", n, dim))
        specs += [_spec("ivf-pq", n, dim, m) for m in _pq_ms(dim)]
    specs.append(_spec("flat", n, dim))  # the fallback, if it fits
    out: list[IndexSpec] = []
    for s in specs:
        if (kind is None or s.kind == kind) and s not in out:
            out.append(s)
    return out


def choose_index(n: int, dim: int, max_memory: int, target_recall: float = 0.9,
                 kind: str | None = None) -> IndexSpec:
    """The most accurate index whose estimated memory fits ``max_memory`` bytes. With ``target_recall`` >= 0.99
    only exact indexes (flat) qualify; otherwise search parameters (nprobe, efSearch) are tuned to the target
    after the build. AnnError when nothing fits (naming the smallest index and its size)."""
    if kind is not None and kind not in KINDS:
        raise AnnError(f"unknown index type {kind!r} (one of {', '.join(KINDS)})")
    if not 0 < target_recall <= 1:
        raise AnnError(f"target recall must be in (0, 1], got {target_recall}")
    specs = candidates(n, dim, "flat" if target_recall >= 0.99 and kind is None else kind)
    for s in specs:
        if s.memory <= max_memory:
            return s
    small = min(specs, key=lambda s: s.memory)
    raise AnnError(f"a memory budget of {_size(max_memory)} is too small for {n} vectors of dimension {dim}: the "
                   f"smallest index that qualifies, {small.factory}, needs about {_size(small.memory)}")


def _size(b: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024:
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return f"{b:.1f} TB"


# -- reading an embed output, streamed ---------------------------------------------------------------
def check_embeddings(emb_dir: str | Path) -> dict[str, Any]:
    """The embed output's index.json, after checking every part is there with the recorded width and rows."""
    emb_dir = Path(emb_dir)
    index = read_index(emb_dir)
    if not index.get("parts"):
        raise AnnError(f"{emb_dir}: the embed output holds no vectors")
    dim = index["embed_dim"]
    for p in index["parts"]:
        path = emb_dir / p["file"]
        if not path.is_file() or not (emb_dir / p["ids"]).is_file():
            raise AnnError(f"{path}: missing; the embed output is incomplete")
        shape = np.load(path, mmap_mode="r").shape
        if len(shape) != 2 or shape[1] != dim:
            raise AnnError(f"{path}: vectors of width {shape[-1]}, other parts (index.json) have {dim}: embeddings "
                           "of mixed widths (parts from different models?)")
        if shape[0] != p["rows"]:
            raise AnnError(f"{path}: {shape[0]} rows, index.json records {p['rows']}")
    return index


def iter_rows(emb_dir: Path, parts: list[dict[str, Any]], start: int, chunk_rows: int) -> Iterator[np.ndarray]:
    """Unit-normalised rows from global row ``start`` on, in chunks of ``chunk_rows`` to twice that (a chunk may
    span parts; the last may be shorter)."""
    offset, pending = 0, []
    for p in parts:
        lo = max(start - offset, 0)
        if lo < p["rows"]:
            emb = np.load(emb_dir / p["file"], mmap_mode="r")
            for b in range(lo, p["rows"], chunk_rows):
                pending.append(emb[b:min(b + chunk_rows, p["rows"])])
                if sum(len(x) for x in pending) >= chunk_rows:
                    yield unit_rows(np.concatenate(pending))
                    pending = []
        offset += p["rows"]
    if pending:
        yield unit_rows(np.concatenate(pending))


def read_rows(emb_dir: Path, parts: list[dict[str, Any]], rows: np.ndarray) -> np.ndarray:
    """Unit-normalised rows at sorted global positions ``rows``, read part by part (memory-mapped)."""
    out, offset = [], 0
    for p in parts:
        sel = rows[(rows >= offset) & (rows < offset + p["rows"])] - offset
        if len(sel):
            out.append(np.asarray(np.load(emb_dir / p["file"], mmap_mode="r")[sel]))
        offset += p["rows"]
    return unit_rows(np.concatenate(out))


def exact_topk(emb_dir: Path, parts: list[dict[str, Any]], queries: np.ndarray, k: int,
               chunk_rows: int = 65536) -> np.ndarray:
    """Global rows of each query's exact top-``k`` by inner product (cosine: rows and queries are unit), one
    chunk in memory at a time (faiss's flat scan per chunk, merged in a faiss result heap)."""
    import faiss

    heap = faiss.ResultHeap(len(queries), k, keep_max=True)
    offset = 0
    for rows in iter_rows(emb_dir, parts, 0, chunk_rows):
        flat = faiss.IndexFlatIP(rows.shape[1])
        flat.add(rows)
        d, i = flat.search(queries, min(k, len(rows)))
        heap.add_result(np.ascontiguousarray(d), np.ascontiguousarray(np.where(i >= 0, i + offset, -1)))
        offset += len(rows)
    heap.finalize()
    return heap.I


def heldout_queries(emb_dir: Path, parts: list[dict[str, Any]], n: int, n_queries: int,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(held-out rows, queries): rows sampled from the collection, perturbed by noise of norm ``QUERY_NOISE``."""
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, min(n_queries, n), replace=False))
    x = read_rows(emb_dir, parts, rows)
    g = rng.standard_normal(x.shape).astype(np.float32)
    return rows, unit_rows(x + QUERY_NOISE * unit_rows(g))


def _train_sample(emb_dir: Path, parts: list[dict[str, Any]], n: int, size: int, heldout: np.ndarray,
                  seed: int) -> np.ndarray:
    """``size`` rows drawn from those not held out (the queries measure the index on vectors it never trained on)."""
    rest = np.setdiff1d(np.arange(n), heldout, assume_unique=True)
    rng = np.random.default_rng(seed + 1)
    return read_rows(emb_dir, parts, np.sort(rng.choice(rest, min(size, len(rest)), replace=False)))


def _metric(metric: str) -> int:
    import faiss

    if metric not in ("ip", "l2"):
        raise AnnError(f"unknown metric {metric!r} (ip or l2)")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _save(index: Any, path: Path) -> None:
    import faiss

    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _start(emb_dir: Path, out: Path, state: dict[str, Any], seed: int) -> tuple[Any, np.ndarray]:
    """The index to add to (the checkpoint on disk, or a new one trained on a sample) and the held-out rows."""
    import faiss

    parts, n = state["parts"], state["count"]
    if (out / "heldout.npy").is_file() and (out / "truth.npy").is_file() and (out / "heldout_rows.npy").is_file():
        rows = np.load(out / "heldout_rows.npy")
    else:
        rows, queries = heldout_queries(emb_dir, parts, n, state["n_queries"], seed)
        truth = exact_topk(emb_dir, parts, queries, RECALL_K)
        for name, arr in (("heldout.npy", queries), ("truth.npy", truth), ("heldout_rows.npy", rows)):
            with atomic_path(out / name) as tmp, open(tmp, "wb") as f:
                np.save(f, arr)
    if (out / INDEX_FILE).is_file():
        return faiss.read_index(str(out / INDEX_FILE)), rows
    spec = IndexSpec(**state["spec"])
    index = faiss.index_factory(state["embed_dim"], spec.factory, _metric(state["metric"]))
    if spec.kind == "hnsw":
        index.hnsw.efConstruction = 80
    if not index.is_trained:
        index.train(_train_sample(emb_dir, parts, n, spec.train_rows, rows, seed))
    _save(index, out / INDEX_FILE)
    return index, rows


def _check_state(out: Path, state: dict[str, Any]) -> None:
    """A rerun into ``out`` must build the same index from the same vectors, or its checkpoint is not ours."""
    path = out / BUILD_NAME
    if path.is_file():
        old = json.loads(path.read_text())
        diff = [k for k in state if k != "added" and old.get(k) != state[k]]
        if diff:
            raise AnnError(f"{out} holds an index build with different {', '.join(diff)}; use a new output "
                           "directory, or the same embeddings and options to resume")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {**state, "added": 0})


def build(emb_dir: str | Path, out_dir: str | Path, *, max_memory: int = 4 << 30, target_recall: float = 0.9,
          metric: str = "ip", kind: str | None = None, chunk_rows: int = 65536, checkpoint_chunks: int = 16,
          n_queries: int = 1000, seed: int = 0, max_chunks: int | None = None, rerank: int | None = None,
          progress_every: float | None = 30.0) -> dict[str, Any] | None:
    """Build (or continue building) an approximate index of the embed output ``emb_dir`` in ``out_dir``; returns
    ann.json's contents, or None when ``max_chunks`` chunks were added and the build is not finished (a rerun
    continues it). The index is written every ``checkpoint_chunks`` chunks of ``chunk_rows`` vectors. ``rerank``
    (IVF-PQ): candidates re-ranked by exact cosine per result (default ``RERANK``; 0: the codes' order)."""
    emb_dir, out = Path(emb_dir).resolve(), Path(out_dir)
    source = check_embeddings(emb_dir)
    _metric(metric)
    n, dim = source["count"], source["embed_dim"]
    spec = choose_index(n, dim, max_memory, target_recall, kind)
    if rerank is not None:
        if rerank < 0 or (rerank and spec.kind != "ivf-pq"):
            raise AnnError(f"rerank {rerank}: re-ranking is for IVF-PQ indexes (>= 0; the others hold the full "
                           f"vectors), the index chosen is {spec.factory}")
        spec.rerank = rerank
    parts = [{"file": p["file"], "ids": p["ids"], "rows": p["rows"]} for p in source["parts"]]
    state = {"embeddings": str(emb_dir), "count": n, "embed_dim": dim, "metric": metric, "spec": asdict(spec),
             "n_queries": n_queries, "seed": seed, "parts": parts}
    _check_state(out, state)
    if (out / ANN_NAME).is_file():
        return read_ann(out)
    t0 = time.perf_counter()
    index, _ = _start(emb_dir, out, state, seed)
    added = index.ntotal
    if added:
        print(f"resuming: {added} of {n} vectors already added in {out}", file=sys.stderr)
    bar = Progress(n, "vector", initial=added, every=progress_every)
    done = 0
    for rows in iter_rows(emb_dir, parts, added, chunk_rows):
        index.add(rows)
        bar.update(len(rows))
        done += 1
        if done % checkpoint_chunks == 0 or (max_chunks is not None and done >= max_chunks):
            _save(index, out / INDEX_FILE)
            write_json_atomic(out / BUILD_NAME, {**state, "added": int(index.ntotal)})
        if max_chunks is not None and done >= max_chunks and index.ntotal < n:
            bar.close()
            return None
    bar.close()
    _save(index, out / INDEX_FILE)
    write_json_atomic(out / BUILD_NAME, {**state, "added": int(index.ntotal)})
    return _finish(emb_dir, out, source, state, index, target_recall, time.perf_counter() - t0)


def _finish(emb_dir: Path, out: Path, source: dict[str, Any], state: dict[str, Any], index: Any,
            target_recall: float, seconds: float) -> dict[str, Any]:
    (out / "ids").mkdir(exist_ok=True)
    parts = []
    for p in state["parts"]:
        name = f"ids/{Path(p['ids']).name}"
        shutil.copyfile(emb_dir / p["ids"], out / name)
        parts.append({"ids": name, "rows": p["rows"], "file": p["file"]})  # file: in the embed output
    embed = {k: v for k, v in source.items() if k not in ("parts", "format", "version")}
    ann = {"format": "mm-ann", "version": 1, "factory": state["spec"]["factory"], "spec": state["spec"],
           "metric": state["metric"], "count": state["count"], "embed_dim": state["embed_dim"],
           "model": source.get("model"), "embeddings": state["embeddings"], "embed": embed, "parts": parts,
           "held_out": {"queries": len(np.load(out / "heldout.npy", mmap_mode="r")), "noise": QUERY_NOISE,
                        "excluded_from_training": True},
           "target_recall": target_recall, "build_seconds": round(seconds, 1),
           "index_bytes": (out / INDEX_FILE).stat().st_size}
    return tune(out, target_recall=target_recall, index=index, ann=ann)


def read_ann(index_dir: str | Path) -> dict[str, Any]:
    path = Path(index_dir) / ANN_NAME
    if not path.is_file():
        raise AnnError(f"{path}: missing; not an approximate index, or its build did not finish (rerun mm index "
                       "build with the same options to complete it)")
    return json.loads(path.read_text())


def is_ann(index_dir: str | Path) -> bool:
    return (Path(index_dir) / ANN_NAME).is_file()


def _knob(spec: dict[str, Any]) -> tuple[str | None, list[int]]:
    """The query-time parameter of an index type and the values ``tune`` tries, cheapest first."""
    if spec["kind"] == "hnsw":
        return "efSearch", [16, 32, 64, 128, 256, 512]
    if spec["kind"].startswith("ivf"):
        return "nprobe", [v for v in (2 ** i for i in range(20)) if v < spec["nlist"]] + [spec["nlist"]]
    return None, [0]


def _set(index: Any, name: str | None, value: int) -> None:
    import faiss

    if name is not None:
        faiss.ParameterSpace().set_index_parameter(index, name, value)


class Searcher:
    """A faiss index answering cosine top-k as global rows, best first; with ``vectors`` (the embed output's parts)
    and ``rerank`` > 0, faiss's ``rerank`` x k best candidates are ordered by their exact cosines instead."""

    def __init__(self, index: Any, metric: str, vectors: Vectors | None = None, rerank: int = 0):
        self.index, self.metric, self.vectors, self.rerank = index, metric, vectors, rerank if vectors else 0

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(cosines [Q, k] float32, -inf where fewer were found; global rows [Q, k], -1 there)."""
        k = min(k, self.index.ntotal)
        if not self.rerank:
            scores, rows = self.index.search(q, k)
            if self.metric == "l2":  # squared distances of unit vectors -> cosines
                scores = 1 - scores / 2
            return np.where(rows >= 0, scores, -np.inf).astype(np.float32), rows
        _, cand = self.index.search(q, min(k * self.rerank, self.index.ntotal))
        vec = self.vectors.rows(np.maximum(cand, 0).ravel()).reshape(*cand.shape, -1)
        scores = np.where(cand >= 0, np.einsum("qkd,qd->qk", vec, q), -np.inf).astype(np.float32)
        order = np.lexsort((cand, -scores), axis=-1)[:, :k]  # ties: the earlier row, as exact search
        scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(cand, order, 1)
        return scores, np.where(np.isfinite(scores), rows, -1)


class Vectors:
    """Random access to an embed output's unit rows by global row: each row read with one positioned read
    (``os.pread``) from its part's .npy file, so memory holds the rows asked for and nothing else (a memory map
    would fault in and keep a read-ahead window around every row: gigabytes after a few thousand queries)."""

    def __init__(self, emb_dir: Path, parts: list[dict[str, Any]]):
        self.fds, self.offsets, self.dtype, self.dim = [], [], None, 0
        for p in parts:
            path = emb_dir / p["file"]
            with open(path, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(f)
                self.offsets.append(f.tell())
            if fortran or len(shape) != 2:
                raise AnnError(f"{path}: not a C-ordered 2-d array")
            self.dtype, self.dim = dtype, shape[1]
            self.fds.append(os.open(path, os.O_RDONLY))
        self.row_bytes = self.dtype.itemsize * self.dim
        self.starts = np.cumsum([0] + [p["rows"] for p in parts])[:-1]

    def rows(self, rows: np.ndarray) -> np.ndarray:
        uniq, back = np.unique(rows, return_inverse=True)  # each row read once, in file order
        part = np.searchsorted(self.starts, uniq, side="right") - 1
        buf = b"".join(os.pread(self.fds[p], self.row_bytes, self.offsets[p] + int(r - self.starts[p]) * self.row_bytes)
                       for p, r in zip(part, uniq))
        return unit_rows(np.frombuffer(buf, self.dtype).reshape(len(uniq), self.dim))[back.ravel()]

    def __del__(self) -> None:
        for fd in getattr(self, "fds", []):
            os.close(fd)


def measure(index: Searcher, queries: np.ndarray, truth: np.ndarray, k: int = RECALL_K) -> dict[str, float]:
    """recall@1, recall@``k`` against exact rows ``truth``, and ms per query at batch 1 (up to 200 queries) and
    at batch 64 (all)."""
    _, found = index.search(queries, k)
    r1 = float(np.mean(found[:, 0] == truth[:, 0]))
    rk = float(np.mean([len(set(f[f >= 0]) & set(t[t >= 0])) / k for f, t in zip(found, truth[:, :k])]))
    few = queries[:200]
    t0 = time.perf_counter()
    for q in few:
        index.search(q[None], k)
    one = (time.perf_counter() - t0) * 1000 / len(few)
    t0 = time.perf_counter()
    for b in range(0, len(queries), 64):
        index.search(queries[b:b + 64], k)
    batch = (time.perf_counter() - t0) * 1000 / len(queries)
    return {"recall@1": round(r1, 4), f"recall@{k}": round(rk, 4), "ms_per_query": round(one, 3),
            "ms_per_query_batch64": round(batch, 4)}


def _vectors(ann: dict[str, Any]) -> Vectors:
    """The embed output's vectors an index re-ranks with (where ann.json says they are)."""
    emb = Path(ann["embeddings"])
    missing = [p["file"] for p in ann["parts"] if not (emb / p["file"]).is_file()]
    if missing:
        raise AnnError(f"{emb / missing[0]}: missing; this {ann['factory']} index re-ranks its candidates with the "
                       "vectors of the embed output it was built from (ann.json 'embeddings'): put them back, or "
                       "re-tune it with rerank 0 to answer from the codes alone")
    return Vectors(emb, ann["parts"])


def _rerank_of(ann: dict[str, Any]) -> int:
    return ann.get("search_params", {}).get("rerank", ann["spec"].get("rerank", 0))


def tune(index_dir: str | Path, *, target_recall: float | None = None, max_latency_ms: float | None = None,
         rerank: int | None = None, index: Any = None, ann: dict[str, Any] | None = None) -> dict[str, Any]:
    """Set the query-time knob (IVF nprobe, HNSW efSearch) on the held-out queries: the cheapest value whose
    recall@10 reaches ``target_recall``, or the most accurate whose batch-1 latency is within ``max_latency_ms``
    (neither: the recorded target). ``rerank`` (IVF-PQ): candidates re-ranked per result (0: none; default:
    as recorded). Every value tried, its recall and latency go into ann.json with the choice; ``meets_target``
    says whether the target was reached (if not, the cheapest value within ``PLATEAU_GAIN`` of the best recall is
    kept, and the sweep stops once ``PLATEAU`` doublings gain no more than that)."""
    import faiss

    out = Path(index_dir)
    ann = ann or read_ann(out)
    if target_recall is not None and max_latency_ms is not None:
        raise AnnError("give a target recall or a latency bound, not both")
    if target_recall is None and max_latency_ms is None:
        target_recall = ann.get("target_recall", 0.9)
    rerank = _rerank_of(ann) if rerank is None else rerank
    if rerank < 0 or (rerank and ann["spec"]["kind"] != "ivf-pq"):
        raise AnnError(f"rerank {rerank}: re-ranking is for IVF-PQ indexes (>= 0; the others hold the full vectors), "
                       f"this one is {ann['factory']}")
    index = index if index is not None else faiss.read_index(str(out / INDEX_FILE))
    searcher = Searcher(index, ann["metric"], _vectors(ann) if rerank else None, rerank)
    queries, truth = np.load(out / "heldout.npy"), np.load(out / "truth.npy")
    name, values = _knob(ann["spec"])
    sweep = []
    key = f"recall@{RECALL_K}"
    for v in values:
        _set(index, name, v)
        sweep.append({"value": v, **measure(searcher, queries, truth)})
        if target_recall is not None and sweep[-1][key] >= target_recall:
            break
        if len(sweep) > PLATEAU and sweep[-1][key] - sweep[-1 - PLATEAU][key] <= PLATEAU_GAIN:
            break  # recall stopped growing (PQ codes cap it): larger values only cost time
    if target_recall is not None:
        ok = [s for s in sweep if s[key] >= target_recall]
        top = max(s[key] for s in sweep)  # missed: the cheapest value within PLATEAU_GAIN of the best recall
        best = ok[0] if ok else next(s for s in sweep if s[key] >= top - PLATEAU_GAIN)
        meets = bool(ok)
    else:
        ok = [s for s in sweep if s["ms_per_query"] <= max_latency_ms]
        best = ok[-1] if ok else sweep[0]
        meets = bool(ok)
    params = {name: best["value"]} if name else {}
    ann = {**ann, "search_params": {**params, "rerank": rerank} if rerank else params,
           "recall": {k: best[k] for k in ("recall@1", f"recall@{RECALL_K}")},
           "latency_ms": {"batch1": best["ms_per_query"], "batch64_per_query": best["ms_per_query_batch64"]},
           "tuned_for": {"target_recall": target_recall} if target_recall is not None
           else {"max_latency_ms": max_latency_ms}, "meets_target": meets, "sweep": sweep}
    write_json_atomic(out / ANN_NAME, ann)
    return ann


_LOADED: dict[str, tuple[float, Any]] = {}


def load(index_dir: str | Path) -> tuple[Searcher, dict[str, Any]]:
    """The searcher of ``index_dir`` (its faiss index with the tuned search parameters set, re-ranking if
    tuned so) and its ann.json; kept loaded while the files are unchanged, for a server answering many queries."""
    import faiss

    out, ann = Path(index_dir), read_ann(index_dir)
    path = out / INDEX_FILE
    key, mtime = str(path.resolve()), (path.stat().st_mtime, (out / ANN_NAME).stat().st_mtime)
    if key not in _LOADED or _LOADED[key][0] != mtime:
        index = faiss.read_index(str(path))
        rerank = _rerank_of(ann)
        for name, value in ann.get("search_params", {}).items():
            if name != "rerank":
                _set(index, name, value)
        _LOADED[key] = (mtime, Searcher(index, ann["metric"], _vectors(ann) if rerank else None, rerank))
    return _LOADED[key][1], ann


def search(index_dir: str | Path, query_embeddings: Any, k: int = 10) -> tuple[np.ndarray, list[list[str]]]:
    """Approximate cosine top-``k`` of each query over the index in ``index_dir``: (scores [Q, k] float32, ids
    per query), best first, as :func:`mm.inference.search.search` returns them. An index may find fewer than
    ``k`` (IVF with few lists probed): those rows' id lists are shorter, their missing scores -inf."""
    out = Path(index_dir)
    searcher, ann = load(out)
    q = query_matrix(query_embeddings, ann["embed_dim"], out)
    scores, rows = searcher.search(q, k)
    starts = np.cumsum([0] + [p["rows"] for p in ann["parts"]])[:-1]
    ids = _ids(out, ann["parts"], starts, np.maximum(rows, 0))
    return scores, [[i for i, r in zip(row, rr) if r >= 0] for row, rr in zip(ids, rows)]
