"""``mm curate {score,filter,write}``: score image-text pairs with a reference model, filter them by rules (CLIP
score, captions, image size, DataComp's image-based clustering, SemDeDup), and reshard the kept samples; over
:mod:`mm.inference.curate` and :mod:`mm.inference.curate_rules`."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ..hub import load_model
from ..inference.curate import (
    SCORES_NAME,
    SKIPPED_NAME,
    CurateError,
    check_score_dir,
    plan_pool,
    run_score,
    score_plan,
    write_kept,
)
from ..inference.curate_rules import format_report, load_recipe, parse_rules, run_filter
from ..inference.embed import EmbedError
from ..utils import dist
from ..utils.host import default_workers
from .common import EXAMPLES, MODEL_ARGS, MODEL_ERRORS, add_model_options, guard


@guard(CurateError, EmbedError, *MODEL_ERRORS)
def cmd_score(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise CurateError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise CurateError(f"--workers must be >= 0, got {args.workers}")
    chunks = plan_pool(args.data, "--data")
    # a mismatched output directory fails before the model is loaded
    check_score_dir(args.out, score_plan(chunks, model_spec=args.model, pretrained=args.pretrained,
                                         adapter=args.adapter, dtype=args.dtype))
    device = args.device or str(dist.start())
    model = load_model(args.model, args.pretrained, device, adapter=args.adapter, names=MODEL_ARGS)
    t0 = time.perf_counter()
    index = run_score(model, chunks, args.out, model_spec=args.model, pretrained=args.pretrained,
                      adapter=args.adapter, batch_size=args.batch_size, workers=args.workers,
                      precision=args.precision, dtype=args.dtype)
    if dist.is_main():
        took = time.perf_counter() - t0
        skipped = f", {index['skipped']} skipped (see {Path(args.out) / SKIPPED_NAME})" if index["skipped"] else ""
        print(f"{index['count']} samples scored (dim {index['embed_dim']}) from {len(index['parts'])} shards in "
              f"{took:.2f} s; scores: {Path(args.out) / SCORES_NAME}{skipped}", file=sys.stderr)
    return 0


# The filter options: each sets one key of one rule (the rule's recipe key in the help), applied in this order.
FLAG_RULES = (("--min-words", "caption_words", "min"), ("--max-words", "caption_words", "max"),
              ("--language", "language", "keep"), ("--min-language-prob", "language", "min_prob"),
              ("--min-side", "image_size", "min_side"), ("--max-side", "image_size", "max_side"),
              ("--max-aspect", "aspect_ratio", "max"),
              ("--min-score", "clip_score", "min"), ("--top-fraction", "clip_score", "top"),
              ("--dedup-captions", "caption_duplicates", None),
              ("--target", "image_clusters", "target"), ("--target-clusters", "image_clusters", "clusters"),
              ("--semdedup-eps", "semdedup", "eps"), ("--semdedup-clusters", "semdedup", "clusters"),
              ("--semdedup-embedding", "semdedup", "embedding"))
SEEDED = ("image_clusters", "semdedup")


def flag_rules(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rules the filter options ask for, as recipe entries, in :data:`FLAG_RULES` order."""
    rules: dict[str, dict[str, Any]] = {}
    for flag, rule, key in FLAG_RULES:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None or value is False:
            continue
        params = rules.setdefault(rule, {})
        if key is not None:
            params[key] = value.split(",") if flag == "--language" else value
    for rule in SEEDED:
        if rule in rules:
            rules[rule]["seed"] = args.seed
    return [{name: params} for name, params in rules.items()]


@guard(CurateError, EmbedError)
def cmd_filter(args: argparse.Namespace) -> int:
    rules = load_recipe(args.recipe, "--recipe") if args.recipe else []
    flags = flag_rules(args)
    if flags:
        rules += parse_rules(flags, "options", names={f"{rule}.{key}": flag for flag, rule, key in FLAG_RULES if key})
    if not rules:
        raise CurateError("no rules: give --recipe FILE or filter options (--min-score, --semdedup-eps, ...)")
    report = run_filter(args.scores, rules, args.out)
    print(format_report(report))
    return 0


@guard(CurateError, EmbedError)
def cmd_write(args: argparse.Namespace) -> int:
    info = write_kept(args.data, args.keep, args.out, samples_per_shard=args.samples_per_shard, prefix=args.prefix,
                      compress=args.gzip, names={"data": "--data", "keep": "--keep"})
    missing = f"; {info['keep_missing']} listed keys are in no shard" if info["keep_missing"] else ""
    sizes = sorted({s["num_samples"] for s in info["shards"]})
    print(f"wrote {info['num_samples']} samples in {len(info['shards'])} shards of "
          f"{' or '.join(map(str, sizes))} samples to {args.out}{missing}")
    return 0


def _add_score(sub: Any) -> None:
    s = sub.add_parser(
        "score", formatter_class=EXAMPLES, help="image and caption embeddings and their cosine per sample",
        description="Embed every sample's image and caption (txt) of webdataset shards with a reference model and\n"
        "score the pair (cosine: the CLIP score). The output holds images/ and texts/, two `mm embed` outputs\n"
        "(mm search, mm index build take them), meta/ (scores, keys, captions, image sizes per shard) and\n"
        "skipped.txt (every unreadable sample and why). Resumable: rerun the same command to finish an\n"
        "interrupted run. Under `accelerate launch` each process scores its share of the shards.\n\n"
        "examples:\n"
        "  mm curate score --model open_clip:ViT-B-32:openai --data 'pool/{00000..00099}.tar' --out curate/scores\n"
        "  accelerate launch --multi_gpu --num_processes 8 -m mm.cli curate score --model M "
        "--data 'pool/{00000..00999}.tar' --out curate/scores")
    add_model_options(s)
    s.add_argument("--data", required=True, metavar="SHARDS", help="webdataset shards (brace ranges, :: joins, URLs)")
    s.add_argument("--out", required=True, metavar="DIR", help="output directory (a rerun resumes it)")
    s.add_argument("--batch-size", type=int, default=64, metavar="N")
    s.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader workers decoding images (0: in-process; default: the available cores but one, 1 "
                        "to 4)")
    s.add_argument("--device", default=None, help="default: this process's accelerator device, else cpu")
    s.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    s.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="stored embeddings (scores are float32 either way)")
    s.set_defaults(fn=cmd_score)


def _add_rule_options(g: argparse._ArgumentGroup) -> None:
    g.add_argument("--min-words", metavar="N", type=int, help="[caption_words.min] keep captions of at least N words")
    g.add_argument("--max-words", metavar="N", type=int, help="[caption_words.max] and at most N words")
    g.add_argument("--language", metavar="CODES", help="[language.keep] keep captions in these languages "
                   "(comma-separated ISO 639-1 codes, e.g. en); needs the py3langid package")
    g.add_argument("--min-language-prob", metavar="P", type=float,
                   help="[language.min_prob] and identified with at least this probability")
    g.add_argument("--min-side", metavar="PX", type=int,
                   help="[image_size.min_side] keep images whose shorter side is at least PX pixels")
    g.add_argument("--max-side", metavar="PX", type=int,
                   help="[image_size.max_side] and whose longer side is at most PX pixels")
    g.add_argument("--max-aspect", metavar="R", type=float,
                   help="[aspect_ratio.max] keep images whose long side is at most R times the short side")
    g.add_argument("--min-score", metavar="X", type=float,
                   help="[clip_score.min] keep pairs whose cosine is >= X (LAION-2B: 0.28 with OpenAI's ViT-B/32)")
    g.add_argument("--top-fraction", metavar="F", type=float,
                   help="[clip_score.top] keep this fraction of the pool, best CLIP scores first (DataComp: 0.3)")
    g.add_argument("--dedup-captions", action="store_true", help="[caption_duplicates] of samples sharing a caption "
                   "(case and spacing aside) keep the best-scored")
    g.add_argument("--target", metavar="DIR", help="[image_clusters.target] DataComp's image-based filter: keep "
                   "samples in the pool's k-means clusters nearest to this target set's image embeddings (an "
                   "`mm embed` output of the same model)")
    g.add_argument("--target-clusters", metavar="K", type=int,
                   help="[image_clusters.clusters] k-means clusters of the pool (default: 1000)")
    g.add_argument("--semdedup-eps", metavar="EPS", type=float, help="[semdedup.eps] SemDeDup: remove "
                   "near-duplicates, cosine > 1 - EPS within a k-means cluster, keeping the one least similar to the "
                   "centroid")
    g.add_argument("--semdedup-clusters", metavar="K", type=int,
                   help="[semdedup.clusters] its k-means clusters (default: 100)")
    g.add_argument("--semdedup-embedding", choices=["image", "text"], help="[semdedup.embedding] (default: image)")


def _add_filter(sub: Any) -> None:
    f = sub.add_parser(
        "filter", formatter_class=EXAMPLES, help="apply filter rules to scored samples: keep list + report",
        description="Apply rules to the samples of an `mm curate score` output, in order, each to the samples still\n"
        "kept: from a YAML recipe (rules: [{clip_score: {min: 0.28}}, ...]; docs/curation.md) and/or the options\n"
        "below (recipe rules first, then the options' rules in the order listed). Writes keep.txt (the kept keys,\n"
        "one a line: data.keep in a training config, or mm curate write), removed.tsv (key and rule) and\n"
        "report.json, and prints how many samples each rule removed.\n\n"
        "examples:\n"
        "  mm curate filter --scores curate/scores --out curate/clip30 --top-fraction 0.3\n"
        "  mm curate filter --scores curate/scores --out curate/dedup --min-score 0.28 --semdedup-eps 0.05\n"
        "  mm curate filter --scores curate/scores --out curate/recipe --recipe recipe.yaml")
    f.add_argument("--scores", required=True, metavar="DIR", help="an `mm curate score` output")
    f.add_argument("--out", required=True, metavar="DIR", help="folder for keep.txt, removed.tsv, report.json")
    f.add_argument("--recipe", metavar="FILE", help="YAML recipe: rules applied in order (docs/curation.md)")
    _add_rule_options(f.add_argument_group("rules (recipe key in brackets)"))
    f.add_argument("--seed", type=int, default=0, help="k-means seed of --target and --semdedup-eps (default: 0)")
    f.set_defaults(fn=cmd_filter)


def _add_write(sub: Any) -> None:
    w = sub.add_parser(
        "write", formatter_class=EXAMPLES, help="reshard the kept samples",
        description="Copy the samples of --data whose key --keep lists (keep.txt of `mm curate filter`, or any list\n"
        "of keys, one a line) into new shards of balanced sizes, in input order, every member's bytes unchanged.\n"
        "(To train on them without rewriting the shards, set data.keep to the list instead.)\n\n"
        "example: mm curate write --data 'pool/{00000..00099}.tar' --keep curate/clip30/keep.txt --out data/clip30")
    w.add_argument("--data", required=True, metavar="SHARDS", help="the shards the keys are samples of")
    w.add_argument("--keep", required=True, metavar="FILE", help="sample keys to keep, one a line")
    w.add_argument("--out", required=True, metavar="DIR", help="folder for the new shards and their info.json")
    w.add_argument("--samples-per-shard", type=int, default=1000, metavar="N",
                   help="at most N samples a shard; sizes are balanced (default: 1000)")
    w.add_argument("--prefix", default="train", help="shard names PREFIX-000000.tar, ... (default: train)")
    w.add_argument("--gzip", action="store_true", help="write .tar.gz shards (default: plain .tar)")
    w.set_defaults(fn=cmd_write)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mm curate {score,filter,write}`` to the ``mm`` command's subparsers; returns its parser."""
    p = subparsers.add_parser("curate", formatter_class=EXAMPLES,
                              help="score, filter and deduplicate image-text data (DataComp, SemDeDup); reshard it",
                              description="Curate image-text shards before training: score every pair with a reference "
                              "model, filter by rules, write the kept samples (docs/curation.md).\n\n"
                              "example: mm curate score --model M --data 'pool/{00000..00099}.tar' --out curate/scores")
    sub = p.add_subparsers(dest="curate_command", required=True, metavar="{score,filter,write}")
    _add_score(sub)
    _add_filter(sub)
    _add_write(sub)
    return p
