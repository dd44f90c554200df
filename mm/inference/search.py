"""Exact cosine top-k over an ``mm embed`` output directory (``mm search``).

The index is streamed part by part, in row blocks, so memory holds one block plus a running top-k per
query, whatever the index size. Rows are L2-normalised on the fly (an index written with
``--no-normalize`` or in float16 still gives exact cosines). Ties break towards the earlier row, so the
result equals a brute-force sort of the whole index. With ``--faiss`` each block is searched by a faiss
flat inner-product index (exact too, faster for many queries) and merged the same way.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..data.decode import IMAGE_KEYS, MAX_PIXELS, BadSample, decode_image
from ..data.folder import load_image
from ..data.wds import iter_shard
from .embed import EmbedError, read_index
from .plots import search_sheet

BLOCK_SCORES = 1 << 24  # scores held at once (64 MB of float32), whatever the number of queries


def _block_topk(q: np.ndarray, rows: np.ndarray, k: int, use_faiss: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, row positions) of each query against one block; unordered, may hold ties."""
    if use_faiss:
        import faiss

        index = faiss.IndexFlatIP(rows.shape[1])
        index.add(np.ascontiguousarray(rows))
        return index.search(np.ascontiguousarray(q), k)
    scores = q @ rows.T  # (Q, n)
    if k < scores.shape[1]:
        pos = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        return np.take_along_axis(scores, pos, axis=1), pos
    return scores, np.broadcast_to(np.arange(scores.shape[1]), scores.shape)


def _merge(best: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], k: int):
    """Keep the ``k`` best of both, ordered by score (descending) then global row (ascending)."""
    scores, rows = np.concatenate([best[0], new[0]], 1), np.concatenate([best[1], new[1]], 1)
    order = np.lexsort((rows, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)


def require_faiss(what: str = "use_faiss") -> None:
    """EmbedError, naming ``what`` (the caller's name for asking for faiss: ``mm search``'s ``--faiss``), if faiss
    cannot be imported."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        raise EmbedError(f"{what}: faiss is not installed (pip install faiss-cpu, or faiss-gpu)") from None


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm, float32, contiguous (what faiss takes)."""
    x = np.asarray(x, np.float32)
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12))


def query_matrix(query_embeddings: Any, embed_dim: int, where: Path) -> np.ndarray:
    """Queries (array or tensor, one or many) as unit rows [Q, embed_dim]; EmbedError naming ``where`` (the index)
    when their width is not the index's."""
    if hasattr(query_embeddings, "detach"):
        query_embeddings = query_embeddings.detach().float().cpu().numpy()
    q = unit_rows(np.atleast_2d(query_embeddings))
    if q.shape[1] != embed_dim:
        raise EmbedError(f"queries have dimension {q.shape[1]}, the index in {where} has {embed_dim} "
                         "(a different model?)")
    return q


def search(index_dir: str | Path, query_embeddings: Any, k: int = 10, *, use_faiss: bool = False,
           block_rows: int | None = None) -> tuple[np.ndarray, list[list[str]]]:
    """Exact cosine top-``k`` of each query ([Q, embed_dim], array or tensor) over the index in
    ``index_dir``: (scores [Q, min(k, N)] float32, ids per query), best first. ``block_rows``: index rows
    scored at once (default: as many as keep Q x rows under 16M scores)."""
    if use_faiss:
        require_faiss()
    out, index = Path(index_dir), read_index(index_dir)
    q = query_matrix(query_embeddings, index["embed_dim"], out)
    k = min(k, index["count"])
    block_rows = block_rows or max(1024, BLOCK_SCORES // len(q))
    best = (np.full((len(q), 0), -np.inf, np.float32), np.zeros((len(q), 0), np.int64))
    starts, offset = [], 0
    for part in index["parts"]:
        starts.append(offset)
        emb = np.load(out / part["file"], mmap_mode="r")  # only the block being scored is read
        for b in range(0, part["rows"], block_rows):
            rows = unit_rows(emb[b:b + block_rows])
            scores, pos = _block_topk(q, rows, min(k, len(rows)), use_faiss)
            best = _merge(best, (scores.astype(np.float32), pos + offset + b), k)
        offset += part["rows"]
    return best[0], _ids(out, index["parts"], np.array(starts, np.int64), best[1])


def merge_topk(found: list[tuple[np.ndarray, list[list[str]]]], k: int) -> tuple[np.ndarray, list[list[str]]]:
    """The best ``k`` of several indexes' answers to the same queries ((scores, ids) each, best first): by score,
    ties towards the earlier index and its earlier hit (one index's answer is kept as it is), each id once.
    Returns (scores [Q, k] float32, -inf past the hits found; ids per query)."""
    scores = np.full((len(found[0][1]), k), -np.inf, np.float32)
    ids: list[list[str]] = []
    for q in range(len(found[0][1])):
        cand = sorted((-float(s), n, r, i) for n, (sc, idx) in enumerate(found)
                      for r, (s, i) in enumerate(zip(sc[q], idx[q])))
        seen: list[str] = []
        for neg, _, _, i in cand:
            if i not in seen:
                scores[q, len(seen)] = -neg
                seen.append(i)
                if len(seen) == k:
                    break
        ids.append(seen)
    return scores, ids


def _ids(out: Path, parts: list[dict[str, Any]], starts: np.ndarray, rows: np.ndarray) -> list[list[str]]:
    """Global row numbers -> ids, reading only the ids files of the parts that hold a result."""
    part_of = np.searchsorted(starts, rows, side="right") - 1
    cache: dict[int, list[str]] = {}
    for p in np.unique(part_of):
        cache[int(p)] = json.loads((out / parts[p]["ids"]).read_text())["ids"]
    return [[cache[int(p)][int(r - starts[p])] for p, r in zip(pp, rr)] for pp, rr in zip(part_of, rows)]


def _dirs(index_dir: str | Path | list[str | Path]) -> list[str | Path]:
    return list(index_dir) if isinstance(index_dir, (list, tuple)) else [index_dir]


def result_images(index_dir: str | Path | list[str | Path], ids: list[str],
                  max_pixels: int = MAX_PIXELS) -> dict[str, Any]:
    """{id: RGB PIL image, or None when it cannot be found or read} for image ids of an ``mm embed`` index (or
    of several, searched together).

    File ids are looked up under the folders index.json records (``sources.roots``, then the current folder);
    shard ids (sample keys) by streaming the recorded shards until every id is found (the first sample with
    a key wins: keys repeated across shards are ambiguous)."""
    sources: dict[str, list[str]] = {"roots": [], "shards": []}
    for d in _dirs(index_dir):
        for key, values in (read_index(d).get("sources") or {}).items():
            sources[key] += [v for v in values if v not in sources[key]]
    found: dict[str, Any] = {}
    for i in dict.fromkeys(ids):
        for root in [*sources.get("roots", []), ""]:
            p = Path(root + i)
            if p.is_file():
                try:
                    found[i] = load_image(p, max_pixels)
                except BadSample:
                    found[i] = None
                break
    rest = {i for i in ids if i not in found}
    for url in sources.get("shards", []):
        if not rest:
            break
        for sample in iter_shard(url, warn=lambda msg: None):
            key = sample["__key__"]
            if key in rest:
                data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
                try:
                    found[key] = decode_image(data, max_pixels) if data is not None else None
                except BadSample:
                    found[key] = None
                rest.discard(key)
                if not rest:
                    break
    return {i: found.get(i) for i in ids}


def plot_results(index_dir: str | Path | list[str | Path], queries: list[Any], scores: np.ndarray, ids: list[list[str]],
                 path: str | Path) -> Path:
    """A PNG sheet, one row per query (a text, or a (PIL image, label) pair): the query, then its results with
    rank, score and id. Results of an image index are shown as images, of a text index as texts."""
    texts = read_index(_dirs(index_dir)[0]).get("kind") == "texts"
    images = {} if texts else result_images(index_dir, [i for row in ids for i in row])
    rows = []
    for query, s, found in zip(queries, scores, ids):
        q = (None, f"query: {query}") if isinstance(query, str) else query
        cells = []
        for r, (v, i) in enumerate(zip(s, found), 1):
            label = f"{r}. {v:.3f}  {i}"
            if texts:
                cells.append((None, label))
            else:
                cells.append((images[i], label) if images[i] is not None else (None, f"{label}\n(image not found)"))
        rows.append((q, cells))
    return search_sheet(rows, path)
