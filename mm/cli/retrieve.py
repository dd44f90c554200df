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
from .common import EXAMPLES, MODEL_ARGS, MODEL_ERRORS, add_model_options, default_device, guard

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


RECO_DESCRIPTION = """\
Build a RECO datastore (retrieval-augmented zero-shot, Iscen et al. 2024) from webdataset shards of image-text
pairs (one source per --images): embeds their images and every caption with --model into OUT/images-N and
OUT/texts-N (resumable, as mm embed),
then trains a small fusion (one transformer block per side) that refines an image embedding with the captions of
its --k nearest datastore images, and a text embedding with the images of its k nearest datastore texts. Each
pair's neighbours leave its own sample out. `mm zeroshot --datastore OUT` then classifies with fused embeddings.

examples:
  mm reco --model runs/flickr8k_coca/final --images '../shared/datasets/flickr8k/train-{0000..0003}.tar' \\
      --images '../shared/datasets/cifar10/train-{0000..0004}.tar.gz' --out reco/flickr-cifar
  mm zeroshot --model runs/flickr8k_coca/final --datastore reco/flickr-cifar ../shared/datasets/cifar10/test-0000.tar.gz"""


@guard(EmbedError, *MODEL_ERRORS)
def cmd_reco(args: argparse.Namespace) -> int:
    from ..hub import load_model
    from ..inference import reco

    for name in ("k", "steps", "batch_size"):
        if getattr(args, name) < 1:
            raise EmbedError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    model = load_model(args.model, args.pretrained, default_device(args.device), adapter=args.adapter,
                       names=MODEL_ARGS)
    info = reco.build(model, args.images, args.out, model_spec=args.model, k=args.k, steps=args.steps,
                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, workers=args.workers)
    log = info["training"]["log"]
    print(f"{info['pairs']} pairs; fusion loss {log[0]['loss']} -> {log[-1]['loss']} in {log[-1]['seconds']} s: "
          f"{args.out}", file=sys.stderr)
    return 0


def add_reco_parser(sub: Any) -> None:
    s = sub.add_parser("reco", help="a datastore of image-text pairs and its fusion, for retrieval-augmented "
                       "zero-shot", description=RECO_DESCRIPTION, formatter_class=EXAMPLES)
    add_model_options(s)
    s.add_argument("--images", required=True, action="append", metavar="SHARDS",
                   help="webdataset shards of images with captions; repeat it for several sources (their sample "
                   "keys may repeat across sources)")
    s.add_argument("--out", required=True, metavar="DIR", help="the datastore directory")
    s.add_argument("--k", type=int, default=8, help="neighbours fused per embedding (default: 8)")
    s.add_argument("--steps", type=int, default=1000, help="fusion training steps (default: 1000)")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=0, help="image-loading processes while embedding")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.set_defaults(fn=cmd_reco)
