"""k-means in embedding space and the two curation rules built on it (``mm curate filter``): DataComp's image-based
clustering filter and SemDeDup's semantic deduplication.

- :func:`kmeans`: spherical k-means (cosine; unit centroids) from a k-means++ start, seeded: the same rows, ``k``
  and seed give the same centroids on any machine with the same float arithmetic. It trains on a sample of at most
  ``max_points_per_centroid * k`` rows (faiss's rule, 256 by default), so its memory is the sample's, not the
  pool's; :func:`assign` then labels every row in blocks streamed from disk.
- :func:`cluster_filter` (Gadre et al. 2023, DataComp, "image-based" filtering): cluster the pool's image embeddings,
  find the nearest cluster of every embedding of a target set (ImageNet's training images in DataComp), keep the
  pool samples whose cluster is one of those.
- :func:`semdedup` (Abbas et al. 2023, SemDeDup): cluster the embeddings, and inside each cluster order the members
  by cosine to the centroid, least similar first; a member whose cosine with any member before it exceeds
  ``1 - eps`` is a near-duplicate and is removed, so of each group of near-duplicates the one least similar to the
  centroid stays (the paper's choice; as in its code, the comparison is with every earlier member, removed or not).
  Memory: one cluster's rows and a block of its similarity matrix (``BLOCK`` scores).

Rows come from an ``mm embed`` output (its ``index.json`` parts), read in blocks (:func:`mm.inference.ann.iter_rows`)
or gathered (:func:`mm.inference.ann.read_rows`), unit-normalised.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .ann import iter_rows, read_rows

BLOCK = 1 << 22  # similarity scores computed at once (16 MB of float32)
ROWS = 1 << 15  # embedding rows read from disk at once
MAX_POINTS_PER_CENTROID = 256  # k-means trains on at most this many rows per cluster (faiss's default)
SEED_ROWS_PER_CENTROID = 32  # k-means++ draws its start from at most this many rows per cluster


def _block_rows(width: int) -> int:
    return max(1, BLOCK // max(width, 1))


def assign(x: np.ndarray | torch.Tensor, centroids: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(nearest centroid, its cosine) of each unit row of ``x`` (``centroids``: unit rows), in blocks; a tie goes to
    the lower centroid index."""
    x = torch.as_tensor(np.asarray(x, np.float32)) if not isinstance(x, torch.Tensor) else x.float()
    labels, sims = np.empty(len(x), np.int64), np.empty(len(x), np.float32)
    step = _block_rows(len(centroids))
    for b in range(0, len(x), step):
        best = (x[b:b + step] @ centroids.T).max(dim=1)  # first index of the maximum on ties
        labels[b:b + step], sims[b:b + step] = best.indices.numpy(), best.values.numpy()
    return labels, sims


def _plus_plus(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) in cosine distance: each next centre drawn with probability
    proportional to the squared distance to the nearest centre so far (n x k x d work: one Lloyd round's)."""
    first = int(torch.randint(len(x), (1,), generator=g))
    chosen = [first]
    dist = (1 - x @ x[first]).clamp_(min=0)
    for _ in range(1, k):
        w = dist.square()
        i = int(torch.multinomial(w, 1, generator=g)) if w.sum() > 0 else \
            int(torch.randint(len(x), (1,), generator=g))  # every row is a centre already: any row
        chosen.append(i)
        dist = torch.minimum(dist, (1 - x @ x[i]).clamp_(min=0))
    return x[chosen].clone()


def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> np.ndarray:
    """Spherical k-means of the unit rows ``x`` [n, d] into ``k`` <= n clusters: unit centroids [k, d] (float32).
    Seeded by k-means++ with ``seed``; a cluster left empty restarts at the row farthest from its own centroid (the
    worst-fitted row), so every centroid ends with members. Stops after ``iters`` rounds or when no row changes
    cluster."""
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means: {k} clusters of {n} rows (need 1 <= clusters <= rows)")
    g = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    # seeding reads its rows k times: from a sample of at most SEED_ROWS_PER_CENTROID * k of them
    seeds = xt if n <= SEED_ROWS_PER_CENTROID * k else xt[torch.randperm(n, generator=g)[:SEED_ROWS_PER_CENTROID * k]]
    c = _plus_plus(seeds, k, g)
    labels = None
    for _ in range(max(iters, 1)):
        new, sims = assign(xt, c)
        counts = np.bincount(new, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):  # restart each empty cluster at one of the worst-fitted rows (distinct ones)
            worst = np.argsort(sims, kind="stable")[:len(empty)]
            new[worst] = empty
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, torch.from_numpy(labels), xt)
        c = torch.nn.functional.normalize(sums, dim=1)
    return c.numpy()


def train_kmeans(emb_dir: Path, parts: list[dict[str, Any]], rows: np.ndarray, k: int, *, iters: int = 20,
                 seed: int = 0, max_points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> np.ndarray:
    """:func:`kmeans` over the embeddings at the sorted global ``rows`` of an embed output, trained on a seeded
    sample of at most ``max_points_per_centroid * k`` of them."""
    cap = max_points_per_centroid * k
    if len(rows) > cap:
        rows = np.sort(np.random.default_rng(seed).choice(rows, cap, replace=False))
    return kmeans(read_rows(emb_dir, parts, rows), k, iters=iters, seed=seed)


def label_rows(emb_dir: Path, parts: list[dict[str, Any]], centroids: np.ndarray,
               rows: np.ndarray | None = None) -> np.ndarray:
    """Nearest centroid of every embedding of an embed output (``rows``: only those sorted global rows), streamed in
    blocks of ``ROWS``."""
    c = torch.from_numpy(np.ascontiguousarray(centroids, np.float32))
    out, offset = [], 0
    for block in iter_rows(emb_dir, parts, 0, ROWS):
        if rows is None:
            out.append(assign(block, c)[0])
        else:
            lo, hi = np.searchsorted(rows, [offset, offset + len(block)])
            if hi > lo:
                out.append(assign(block[rows[lo:hi] - offset], c)[0])
        offset += len(block)
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def cluster_filter(pool_dir: Path, pool_parts: list[dict[str, Any]], target_dir: Path,
                   target_parts: list[dict[str, Any]], clusters: int, *, iters: int = 20,
                   seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """DataComp's image-based filter: (mask of the pool's rows whose cluster holds the nearest centroid of some target
    embedding, statistics). The pool's embeddings are clustered whole (all rows), as DataComp does."""
    n = sum(p["rows"] for p in pool_parts)
    centroids = train_kmeans(pool_dir, pool_parts, np.arange(n), clusters, iters=iters, seed=seed)
    labels = label_rows(pool_dir, pool_parts, centroids)
    chosen = np.unique(label_rows(target_dir, target_parts, centroids))
    return np.isin(labels, chosen), {"clusters": clusters, "target_clusters": int(len(chosen))}


def near_duplicates(x: np.ndarray, centroid: np.ndarray, eps: float) -> np.ndarray:
    """SemDeDup inside one cluster: which of its unit rows ``x`` [n, d] are removed (bool [n], in ``x``'s order).
    Members are ordered by cosine to ``centroid``, least similar first (ties: the earlier row); a member is removed
    when its cosine with any member before it exceeds ``1 - eps``."""
    n = len(x)
    xt = torch.from_numpy(np.ascontiguousarray(x, np.float32))
    order = torch.from_numpy(np.lexsort((np.arange(n), x @ np.asarray(centroid, np.float32))))
    xs = xt[order]
    removed_sorted = torch.zeros(n, dtype=torch.bool)
    step = _block_rows(n)
    for b0 in range(0, n, step):
        b1 = min(n, b0 + step)
        s = xs[b0:b1] @ xs[:b1].T  # (rows of the block, every member up to the block's end)
        later = torch.arange(b1)[None, :] >= torch.arange(b0, b1)[:, None]  # i >= j: not before j
        removed_sorted[b0:b1] = s.masked_fill_(later, -2.0).max(dim=1).values > 1 - eps
    removed = torch.empty(n, dtype=torch.bool)
    removed[order] = removed_sorted
    return removed.numpy()


def semdedup(emb_dir: Path, parts: list[dict[str, Any]], rows: np.ndarray, eps: float, clusters: int, *,
             iters: int = 20, seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """SemDeDup over the embeddings at the sorted global ``rows``: (the rows removed, sorted; statistics). At most
    ``clusters`` clusters (fewer when there are fewer rows); each cluster's members are gathered from disk and
    deduplicated by :func:`near_duplicates`."""
    if len(rows) < 2:
        return np.zeros(0, np.int64), {"clusters": 0, "largest_cluster": len(rows)}
    k = min(clusters, len(rows))
    centroids = train_kmeans(emb_dir, parts, rows, k, iters=iters, seed=seed)
    labels = label_rows(emb_dir, parts, centroids, rows)
    order = np.argsort(labels, kind="stable")  # rows grouped by cluster, each group in row order
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    removed = []
    for c in range(k):
        members = rows[order[bounds[c]:bounds[c + 1]]]
        if len(members) > 1:
            gone = near_duplicates(read_rows(emb_dir, parts, members), centroids[c], eps)
            removed.append(members[gone])
    out = np.sort(np.concatenate(removed)) if removed else np.zeros(0, np.int64)
    return out, {"clusters": k, "largest_cluster": int(np.diff(bounds).max())}
