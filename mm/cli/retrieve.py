"""``mm retrieve``: what each image of an ``mm embed`` output retrieves from a caption datastore, as the JSON lines a
retrieval-augmented training run reads (``data.retrieval.captions``; :func:`mm.inference.retrieval.write_retrieved`)."""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from ..inference.ann import AnnError
from ..inference.embed import EmbedError
from ..inference.retrieval import write_retrieved
from .common import EXAMPLES, guard

DESCRIPTION = """\
For every image of an `mm embed` output (--queries; embed the training shards, so ids are sample keys), the --k
captions a datastore returns (an `mm embed --texts` output of captions, or an `mm index build` over one), best
first, never the image's own captions (a datastore made from the same shards names each caption's sample:
ids KEY#I). Writes JSON lines {"key", "captions"} to --out: give it to training as data.retrieval.captions.
Deterministic: the same inputs give the same file. Queries and captions must come from the same model.

examples:
  mm embed --model runs/ret/final --texts 'shards/train-{0000..0003}.tar' --out emb/captions
  mm embed --model runs/ret/final --images 'shards/train-{0000..0003}.tar' --out emb/train
  mm retrieve --datastore emb/captions --queries emb/train --out retrieved.jsonl --k 4
  mm train ra.yaml data.retrieval.captions=retrieved.jsonl"""


@guard(EmbedError, AnnError)
def cmd_retrieve(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise EmbedError(f"--k must be >= 1, got {args.k}")
    t0 = time.perf_counter()
    n = write_retrieved(args.datastore, args.queries, args.out, args.k, exclude_self=not args.keep_own,
                        allow_other_model=args.allow_other_model)
    print(f"{n} images, {args.k} captions each, in {time.perf_counter() - t0:.1f} s: {args.out}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("retrieve", help="captions retrieved for each training image, for retrieval-augmented training",
                       description=DESCRIPTION, formatter_class=EXAMPLES)
    s.add_argument("--datastore", required=True, metavar="DIR", help="the captions: an `mm embed --texts` output "
                   "(or an `mm index build` over one)")
    s.add_argument("--queries", required=True, metavar="DIR", help="the images: an `mm embed --images` output")
    s.add_argument("--out", required=True, metavar="FILE", help="the JSON lines to write")
    s.add_argument("--k", type=int, default=4, help="captions per image (default: 4)")
    s.add_argument("--keep-own", action="store_true", help="do not leave out an image's own captions")
    s.add_argument("--allow-other-model", action="store_true", help="queries and captions embedded by different "
                   "models of the same width (refused by default)")
    s.set_defaults(fn=cmd_retrieve)
