"""``mm index``: approximate nearest-neighbour indexes (faiss) over an ``mm embed`` output, chosen by a memory budget
and measured against exact search (:mod:`mm.inference.ann`); ``mm search --index DIR`` answers from them."""
from __future__ import annotations

import argparse
import json
from typing import Any

from ..inference.ann import KINDS, AnnError, build, parse_memory, tune
from ..inference.embed import EmbedError
from ..inference.search import require_faiss
from .common import EXAMPLES, guard


def _summary(ann: dict[str, Any]) -> str:
    return json.dumps({k: ann[k] for k in ("factory", "count", "embed_dim", "metric", "search_params", "recall",
                                           "latency_ms", "meets_target", "index_bytes")})


@guard(AnnError, EmbedError)
def cmd_build(args: argparse.Namespace) -> int:
    require_faiss("mm index")
    if not 0 < args.target_recall <= 1:
        raise AnnError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.chunk_rows < 1 or args.queries < 1:
        raise AnnError("--chunk-rows and --queries must be >= 1")
    ann = build(args.embeddings, args.out, max_memory=parse_memory(args.max_memory), target_recall=args.target_recall,
                metric=args.metric, kind=None if args.type == "auto" else args.type, chunk_rows=args.chunk_rows,
                n_queries=args.queries, rerank=args.rerank)
    print(_summary(ann))
    return 0 if ann["meets_target"] else 1


@guard(AnnError, EmbedError)
def cmd_tune(args: argparse.Namespace) -> int:
    require_faiss("mm index")
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        raise AnnError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    if args.max_latency_ms is not None and args.max_latency_ms <= 0:
        raise AnnError(f"--max-latency-ms must be > 0, got {args.max_latency_ms}")
    ann = tune(args.index, target_recall=args.target_recall, max_latency_ms=args.max_latency_ms, rerank=args.rerank)
    print(_summary(ann))
    return 0 if ann["meets_target"] else 1


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mm index {build,tune}`` to the ``mm`` command's subparsers; returns its parser."""
    p = subparsers.add_parser("index", help="approximate nearest-neighbour indexes (faiss) of an `mm embed` output",
                              formatter_class=EXAMPLES,
                              description="Build and tune approximate indexes over an `mm embed` output; `mm search "
                              "--index DIR` uses one when DIR holds it.\n\n"
                              "example: mm index build --embeddings emb/photos --out ann/photos --max-memory 2GB")
    sub = p.add_subparsers(dest="index_command", required=True, metavar="{build,tune}")
    b = sub.add_parser("build", formatter_class=EXAMPLES, help="choose, train, fill and measure an index",
                       description="Choose the index (flat / HNSW / IVF-Flat / IVF-PQ and its parameters) that fits\n"
                       "--max-memory, train it on a sample, add the vectors in chunks (streamed, checkpointed: a\n"
                       "killed build continues when rerun with the same options), then measure recall@1/@10 against\n"
                       "exact search on held-out queries (perturbed vectors left out of training) and set nprobe /\n"
                       "efSearch for --target-recall. IVF-PQ re-ranks candidates with the exact vectors, read from\n"
                       "the embed output (keep it where it is). Writes index.faiss, ids/, ann.json (how it was built, recall,\n"
                       "latency) into --out. Prints a JSON summary; exit 1 if the target recall was not reached.\n\n"
                       "example: mm index build --embeddings emb/photos --out ann/photos\n"
                       "example: mm index build --embeddings emb/laion --out ann/laion --max-memory 2GB "
                       "--target-recall 0.9")
    b.add_argument("--embeddings", required=True, metavar="DIR", help="an `mm embed` output directory")
    b.add_argument("--out", required=True, metavar="DIR", help="folder for the index (a rerun resumes it)")
    b.add_argument("--max-memory", default="4GB", help="memory the index may take (default: 4GB)")
    b.add_argument("--target-recall", type=float, default=0.9, help="recall@10 to tune for (default: 0.9); >= 0.99: "
                   "exact (flat) only")
    b.add_argument("--metric", choices=["ip", "l2"], default="ip",
                   help="faiss metric on the unit vectors (same ranking; scores are cosines either way)")
    b.add_argument("--type", choices=["auto", *KINDS], default="auto", help="index type (default: chosen by budget)")
    b.add_argument("--chunk-rows", type=int, default=65536, help="vectors added at once (default: 65536)")
    b.add_argument("--queries", type=int, default=1000, help="held-out queries measuring recall (default: 1000)")
    b.add_argument("--rerank", type=int, default=None, metavar="N", help="IVF-PQ: order N x k candidates by their "
                   "exact cosines, read from the embed output on disk (default: 10; 0: the codes' order)")
    b.set_defaults(fn=cmd_build)
    t = sub.add_parser("tune", formatter_class=EXAMPLES, help="set nprobe / efSearch for a recall or a latency",
                       description="Set an index's query-time knob (IVF nprobe, HNSW efSearch) on its held-out\n"
                       "queries: the cheapest value reaching --target-recall, or the most accurate one answering a\n"
                       "single query within --max-latency-ms. Recorded in ann.json.\n\n"
                       "example: mm index tune --index ann/photos --target-recall 0.95\n"
                       "example: mm index tune --index ann/photos --max-latency-ms 5")
    t.add_argument("--index", required=True, metavar="DIR", help="an `mm index build` output")
    t.add_argument("--rerank", type=int, default=None, metavar="N", help="IVF-PQ: candidates re-ranked by exact "
                   "cosine per result (0: none; default: as built)")
    g = t.add_mutually_exclusive_group()
    g.add_argument("--target-recall", type=float, default=None, help="recall@10 to reach (default: the build's)")
    g.add_argument("--max-latency-ms", type=float, default=None, help="batch-1 latency bound per query, ms")
    t.set_defaults(fn=cmd_tune)
    return p
