"""What the ``mm`` commands share: the ``--model`` options and help, the one error guard (a user's mistake is
one line naming it and exit code 2, not a traceback), the default device, and the ``--classes`` /
``--templates`` / ``--out`` readers."""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..eval.zeroshot import load_names
from ..hub import ConversionError, PretrainedError
from ..hub.adapter import AdapterError
from ..hub.wrapped import WrappedModelError
from ..layers.lora import LoraError
from ..tokenizer import TokenizerUnavailable

MODEL_HELP = ("an mm model directory (a run's final/ or save_pretrained), open_clip:NAME[:TAG] (open_clip's "
              "registry), a preset name with --pretrained FILE, or a LoRA adapter directory (the base it records, "
              "with the adapter)")
PRETRAINED_HELP = "weights file for a preset --model (mm or open_clip checkpoint)"
ADAPTER_HELP = ("a LoRA adapter directory (a LoRA run's final/, mm finetune --lora's finetuned/) put on --model, "
                "its base: the base weights are checked against the ones it was trained on")
# what the commands call load_model's arguments, so that its messages name the options (``names=MODEL_ARGS``)
MODEL_ARGS = {"spec": "--model", "pretrained": "--pretrained", "adapter": "--adapter"}
# what the commands call the class names of mm.eval.classify's label_images / resolve_shards (``names=CLASSES_ARG``)
CLASSES_ARG = {"classnames": "--classes"}
EXAMPLES = argparse.RawDescriptionHelpFormatter  # descriptions end with examples, laid out as written

Command = Callable[[argparse.Namespace], int]

# What loading and using a --model raises that is its user's to fix: a broken model directory or weights file, a
# config mm cannot read (NotNative, an open_clip model mm does not build, is a ConfigError), weights that do not
# fit, a tokenizer that cannot be loaded, a model mm runs through open_clip asked for what needs mm's blocks, and
# a LoRA adapter that is incomplete or does not fit its --model (other weights, another architecture).
MODEL_ERRORS: tuple[type[BaseException], ...] = (PretrainedError, ConfigError, ConversionError,
                                                 TokenizerUnavailable, WrappedModelError, AdapterError, LoraError)


class UsageError(ValueError):
    """Options that do not fit together (``--to-open-clip`` without ``--model DIR``, ...)."""


def guard(*errors: type[BaseException]) -> Callable[[Command], Command]:
    """A command whose ``errors`` (bad input the user can fix) print ``error: MESSAGE`` and exit with 2. Each
    command names the errors that are its user's to fix; anything else is a bug and keeps its traceback."""
    def wrap(fn: Command) -> Command:
        @functools.wraps(fn)
        def run(args: argparse.Namespace) -> int:
            try:
                return fn(args)
            except errors as e:
                print(f"error: {e}", file=sys.stderr)
                return 2
        return run
    return wrap


def add_model_options(p: argparse.ArgumentParser, *, required: bool = True, model_help: str = MODEL_HELP,
                      pretrained_help: str = PRETRAINED_HELP, adapter_help: str = ADAPTER_HELP) -> None:
    """``--model``, ``--pretrained`` and ``--adapter``, as every command that loads a model takes them (each
    passes them on as ``load_model(args.model, args.pretrained, ..., adapter=args.adapter, names=MODEL_ARGS)``)."""
    p.add_argument("--model", required=required, help=model_help)
    p.add_argument("--pretrained", help=pretrained_help)
    p.add_argument("--adapter", metavar="DIR", help=adapter_help)


def add_model_and_labelled_shards(p: argparse.ArgumentParser) -> None:
    """The options ``mm probe`` and ``mm finetune`` share: the model and the labelled train / test shards."""
    add_model_options(p)
    p.add_argument("--train", required=True, metavar="SHARDS", help="labelled training shards (brace ranges, :: joins)")
    p.add_argument("--test", required=True, metavar="SHARDS", help="labelled test shards")


def default_device(device: str | None) -> str:
    """``--device``, else cuda when there is one, else cpu."""
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def parse_classes(spec: str | None) -> list[str] | None:
    """``--classes``: a .txt / .json file, or names separated by commas."""
    if spec is None:
        return None
    if Path(spec).is_file():
        return load_names(spec, "classnames")
    if "," not in spec:
        raise FileNotFoundError(f"--classes {spec!r}: no such file (a list of names is comma-separated: a,b,c)")
    return load_names([c.strip() for c in spec.split(",")], "classnames")


def parse_templates(spec: str | None) -> list[str] | None:
    """``--templates``: a .txt / .json file, or one template with ``{}`` for the class name."""
    if spec is None:
        return None
    if Path(spec).is_file():
        return load_names(spec, "templates")
    if "{}" not in spec:
        raise FileNotFoundError(f"--templates {spec!r}: no such file (or give one template, with {{}} where the "
                                "class name goes)")
    return [spec]


def check_out(out: str | None, suffixes: tuple[str, ...]) -> Path | None:
    """``--out FILE``: one of ``suffixes``, in an existing folder (checked before any work)."""
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"--out {out}: must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {path.parent} does not exist")
    return path


def add_config_flags(p: argparse.ArgumentParser, cls: type, *, skip: tuple[str, ...] = (),
                     choices: dict[str, list[str]] | None = None) -> list[str]:
    """One ``--field-name`` option per field of the dataclass ``cls`` (``skip`` aside), so that a command's options
    are its config's keys, as ``mm train``'s ``section.key=value`` are: the value is read as such an override is
    (YAML: ``1e-3``, ``null``; ``0.9,1.0`` for a pair), then checked against the field's type; the default is the
    field's and the help the comment beside it in the source. Returns the names of the fields given options."""
    import dataclasses
    import typing

    from ..config import field_comments

    hints, comments, names = typing.get_type_hints(cls), field_comments(cls), []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        shown = "null" if default is None else default
        shown = ",".join(map(str, default)) if isinstance(default, (tuple, list)) else shown
        p.add_argument(f"--{f.name.replace('_', '-')}", type=_config_value(hints[f.name], f.name), default=default,
                       choices=(choices or {}).get(f.name),
                       help=f"{comments.get(f.name, '')} (default: {shown})".strip().replace("%", "%%"))
        names.append(f.name)
    return names


def _config_value(tp: object, key: str) -> Callable[[str], object]:
    """A flag's parser for a config field of type ``tp`` (argparse names ``tp`` in its message when it fails)."""
    from ..config import parse_typed

    def parse(text: str) -> object:
        try:
            return parse_typed(text, tp, key)
        except ConfigError as e:
            raise argparse.ArgumentTypeError(str(e).removeprefix(f"{key}: ")) from None

    parse.__name__ = getattr(tp, "__name__", str(tp))
    return parse


SEQ_LEN_HELP = ("NaFlex: each image at its own aspect ratio, cut into at most N of the model's patches (SigLIP 2's "
                "NaFlex; models with a patchify image tower); default: square images at the model's image_size")


def patch_count(text: str) -> int:
    """argparse type of ``--seq-len``: a positive number of patches (a bad one fails before any work)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of patches: {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 patch (the smallest grid is 1x1), got {n}")
    return n


def add_seq_len(p: argparse.ArgumentParser, help: str = SEQ_LEN_HELP) -> None:
    p.add_argument("--seq-len", type=patch_count, metavar="N", help=help)


def check_seq_len(model: Any, seq_len: int | None) -> int | None:
    """``--seq-len`` against the loaded model: a positive count, and an image tower that takes patch sequences."""
    from ..models import VisionTower, naflex_problem

    if seq_len is None:
        return None
    if seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1 (patches per image), got {seq_len}")
    tower = getattr(model, "vision", None)
    if not isinstance(tower, VisionTower):
        raise ValueError("--seq-len: NaFlex needs an mm image tower of its own; this model has none (a one-tower "
                         "model, or one run through open_clip)")
    problem = naflex_problem(tower.cfg)
    if problem:
        raise ValueError(f"--seq-len: this model's image tower takes square images only: {problem}")
    return seq_len
