"""The ``mm`` command (``mm`` on the PATH, ``python -m mm``, ``accelerate launch -m mm.cli``). Each command group is
a module here with its parser and its ``cmd_*`` functions; the work itself is library code in the layers below."""
from __future__ import annotations

import argparse

from ..utils import dist
from ..utils.host import tune_malloc
from . import benchmark, caption, convert, curate, embed, eval, finetune, ground, index, models, retrieve, serve, shards, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm", description="Train and use CLIP-style image-text models.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in (models.add_models_parser, train.add_parser, shards.add_parser, embed.add_embed_parser,
                embed.add_search_parser, index.add_parser, curate.add_parser, retrieve.add_parser, retrieve.add_reco_parser, eval.add_zeroshot_and_eval_parsers, eval.add_probe_parser,
                benchmark.add_parser, finetune.add_parser, convert.add_export_parser, caption.add_parser,
                ground.add_parser, convert.add_convert_parser, convert.add_merge_parser, serve.add_parser,
                models.add_demo_parser):
        add(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()  # a command owns its process: reuse freed activations' pages (mm/utils/host.py says why)
    try:
        return args.fn(args)
    finally:
        dist.shutdown()  # under `accelerate launch`: the process group's threads end before the interpreter does
