"""``mm train``: one YAML config plus ``section.key=value`` overrides (``mm.train.trainer``)."""
from __future__ import annotations

import argparse
from typing import Any

from ..train.trainer import main as train_main
from .common import EXAMPLES, MODEL_ERRORS, guard


@guard(*MODEL_ERRORS)  # a bad key or value (ConfigError), a model mm cannot train: one line naming it
def cmd_train(args: argparse.Namespace) -> int:
    config = args.config
    overrides = list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml", ".json")):
        overrides.insert(0, config)  # only overrides were given
        config = None
    return train_main(config, overrides)


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "train", help="train a model from webdataset shards",
        description="Train a model. One YAML config plus section.key=value overrides; run under `accelerate "
                    "launch` for several processes.\n\nexamples:\n  mm train data/builtin.yaml\n"
                    "  mm train data/builtin.yaml train.steps=2000 data.batch_size=128 output_dir=runs/b128\n"
                    "  mm train data/builtin.yaml model=micro-clip distill.teacher=runs/builtin/final "
                    "output_dir=runs/micro_distilled\n"
                    "  accelerate launch --multi_gpu --num_processes 2 -m mm.cli train data/builtin.yaml",
        formatter_class=EXAMPLES)
    s.add_argument("config", nargs="?", help="YAML/JSON run config (optional if every key is given as an override)")
    s.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    s.set_defaults(fn=cmd_train)
