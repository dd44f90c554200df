"""`mm index` at scale: build time, index size, recall@10 against exact search and queries/s (batch 1 and 64) of
each index type, and of the exact streamed scan (`mm search --exact`), on synthetic CLIP-like vectors.

The vectors are a mixture of Gaussians on the sphere (512-d by default: 1,000 random unit centres, each vector
its centre plus Gaussian noise in a shared 32-d subspace and a little isotropic noise, renormalised), written as an `mm embed` output in parts of 100,000 rows, generated and written one part at a time
(never all in memory). Recall is measured by `mm index build` itself on 1,000 held-out queries (rows left out of
the training sample, perturbed), against the exact top-10 of a flat scan; each index is tuned to
--target-recall, so the recall / speed pair is the tuned one.

    python benchmarks/bench_ann.py --n 1000000 --work /tmp/bench_ann
    python benchmarks/bench_ann.py --n 1000000 --types ivf-flat ivf-pq --max-memory 2GB

Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

from mm.inference import ann
from mm.inference.search import search

PART = 100_000
LATENT = 32  # within a cluster vectors vary along 32 shared directions (+ small isotropic noise): low intrinsic
# dimension, as real embeddings have, so neighbours are meaningful (isotropic 512-d noise makes them all ties)


def write_vectors(out: Path, n: int, dim: int, clusters: int, noise: float, seed: int, dtype: str = "float32") -> Path:
    """A mixture of Gaussians on the sphere as an `mm embed` output, one part in memory at a time."""
    if (out / "index.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    basis = rng.standard_normal((dim, LATENT)).astype(np.float32) / np.sqrt(dim)  # unit-ish columns
    parts = []
    for c, start in enumerate(range(0, n, PART)):
        rows = min(PART, n - start)
        z = rng.standard_normal((rows, LATENT), np.float32)
        x = (centres[rng.integers(0, clusters, rows)] + noise * (z @ basis.T) / np.sqrt(LATENT)
             + 0.1 * rng.standard_normal((rows, dim), np.float32) / np.sqrt(dim))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        stem = f"part-000-{c:06d}"
        (out / f"{stem}.ids.json").write_text(json.dumps({"ids": [f"v{start + i}" for i in range(rows)],
                                                          "skipped": []}))
        np.save(out / f"{stem}.npy", x.astype(dtype))
        parts.append({"file": f"{stem}.npy", "ids": f"{stem}.ids.json", "rows": rows})
    index = {"format": "mm-embed", "version": 1, "kind": "images", "model": None, "pretrained": None,
             "normalized": True, "dtype": dtype, "embed_dim": dim, "count": n, "skipped": 0, "parts": parts}
    (out / "index.json").write_text(json.dumps(index))
    return out


def exact_speed(emb: Path, queries: np.ndarray) -> tuple[float, float]:
    """Queries/s of the exact streamed scan (`mm search`), batch 1 (3 queries) and batch 64."""
    t0 = time.perf_counter()
    for q in queries[:3]:
        search(emb, q[None], 10)
    one = 3 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    search(emb, queries[:64], 10)
    return one, 64 / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="of the stored vectors (float16 as `mm embed --dtype float16`: half the disk)")
    p.add_argument("--noise", type=float, default=1.0, help="norm of a vector's in-cluster variation (its centre's is 1)")
    p.add_argument("--types", nargs="+", default=["auto", "ivf-flat", "ivf-pq", "hnsw"])
    p.add_argument("--max-memory", default="64GB", help="budget for the explicit types (auto: --auto-memory)")
    p.add_argument("--auto-memory", default="2GB")
    p.add_argument("--target-recall", type=float, default=0.9)
    p.add_argument("--work", default="/tmp/bench_ann")
    p.add_argument("--keep", action="store_true", help="keep the indexes (default: delete each after measuring)")
    args = p.parse_args()
    work = Path(args.work)
    t0 = time.perf_counter()
    emb = write_vectors(work / f"emb-{args.n}-{args.dim}-{args.dtype}", args.n, args.dim, args.clusters, args.noise, 0,
                        args.dtype)
    print(f"vectors: {args.n} x {args.dim} in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for kind in args.types:
        out = work / f"ann-{args.n}-{kind}"
        budget = ann.parse_memory(args.auto_memory if kind == "auto" else args.max_memory)
        t0 = time.perf_counter()
        info = ann.build(emb, out, max_memory=budget, target_recall=args.target_recall,
                         kind=None if kind == "auto" else kind, progress_every=60)
        secs = time.perf_counter() - t0
        lat = info["latency_ms"]
        rows.append((kind, info["factory"], json.dumps(info["search_params"]), secs, info["index_bytes"],
                     info["recall"]["recall@10"], 1000 / lat["batch1"], 1000 / lat["batch64_per_query"]))
        print(rows[-1], flush=True)
        if info["search_params"].get("rerank"):  # the same index answering from its codes alone
            codes = ann.tune(out, rerank=0)
            lat = codes["latency_ms"]
            rows.append((f"{kind}, no re-ranking", info["factory"], json.dumps(codes["search_params"]), secs,
                         info["index_bytes"], codes["recall"]["recall@10"], 1000 / lat["batch1"],
                         1000 / lat["batch64_per_query"]))
            print(rows[-1], flush=True)
            ann.tune(out, rerank=info["search_params"]["rerank"])
        queries = np.load(out / "heldout.npy")
        if not args.keep:
            shutil.rmtree(out)
    one, batch = exact_speed(emb, queries)
    size = sum(f.stat().st_size for f in emb.glob("*.npy"))
    rows.append(("exact (mm search)", "streamed scan", "-", 0.0, size, 1.0, one, batch))
    print("\n| type | factory | params | build s | index MB | recall@10 | q/s batch 1 | q/s batch 64 |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for kind, factory, params, secs, size, recall, q1, q64 in rows:
        print(f"| {kind} | {factory} | {params} | {secs:.0f} | {size / 2**20:.0f} | {recall:.3f} | {q1:.3g} | {q64:.3g} |")


if __name__ == "__main__":
    main()
