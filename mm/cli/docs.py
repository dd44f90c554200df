"""Generated reference pages: ``python -m mm.cli.docs config > docs/config.md`` and ``... cli > docs/cli.md``
(``make docs`` runs both). The test suite regenerates them and fails when the committed pages are stale.

config: every key of the run config (``RunConfig``) and the model config (``ModelConfig``) with its type,
default and the comment written next to the field in the source (comment lines directly above a field, then
the comment on its line), read with ``ast`` + ``tokenize``: the dataclasses stay the one place a key is
described. cli: ``mm --help`` and ``mm COMMAND --help`` for every command and ``mm shards`` subcommand, at a
fixed width with colour off.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import os
import sys
import typing
from collections.abc import Iterator
from typing import Any

from ..config import field_comments
from ..models import ModelConfig
from ..train.config import RunConfig
from . import build_parser

HELP_COLUMNS = 100  # the width help is rendered at in docs/cli.md


# -- config reference ----------------------------------------------------------------------------------
def _dataclass_in(tp: Any) -> type | None:
    if dataclasses.is_dataclass(tp):
        return tp
    for a in typing.get_args(tp):
        if dataclasses.is_dataclass(a):
            return a
    return None


def _value(v: Any) -> str:
    if dataclasses.is_dataclass(v):
        return "(section)"
    if isinstance(v, tuple):
        v = list(v)
    return json.dumps(v, ensure_ascii=False)


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return _value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _value(f.default_factory())
    return "(required)"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _walk(root: type, prefix: str, seen: dict[type, list[str]], order: list[type]) -> None:
    """Depth-first over nested dataclass sections: ``order`` of first appearance, ``seen`` = their key paths."""
    if root not in seen:
        seen[root] = []
        order.append(root)
    if prefix:
        seen[root].append(prefix)
    hints = typing.get_type_hints(root)
    for f in dataclasses.fields(root):
        sub = _dataclass_in(hints[f.name])
        if sub is not None:
            _walk(sub, f"{prefix}{f.name}.", seen, order)


def _section(cls: type, paths: list[str]) -> Iterator[str]:
    yield f"### `{cls.__name__}`"
    yield ""
    if paths:
        shown = [f"`{p.rstrip('.')}`" for p in paths[:8]]
        more = f" and {len(paths) - 8} more" if len(paths) > 8 else ""
        yield f"Keys: {', '.join(shown)}{more}."
        yield ""
    doc = inspect.getdoc(cls) or ""
    if doc and not doc.startswith(f"{cls.__name__}("):  # not the signature dataclasses write by default
        yield " ".join(doc.split())
        yield ""
    hints = typing.get_type_hints(cls)
    comments = field_comments(cls)
    yield "| key | type | default | description |"
    yield "| --- | --- | --- | --- |"
    for f in dataclasses.fields(cls):
        sub = _dataclass_in(hints[f.name])
        typ = _cell(f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type)))
        desc = comments.get(f.name, "")
        if sub is not None:
            desc = f"section [`{sub.__name__}`](#{sub.__name__.lower()}). {desc}".strip()
        yield f"| `{f.name}` | `{typ}` | `{_cell(_default(f))}` | {_cell(desc)} |"
    yield ""


CONFIG_INTRO = """\
# Configuration reference

Generated from the config dataclasses by `python -m mm.cli.docs config > docs/config.md` (`make docs`); a test
fails when this page is stale. Descriptions are the comments next to each field in the source.

A training run is one YAML file plus `section.key=value` overrides on the command line (values are YAML:
`1e-3`, `true`, `null`, `[vision]`, `{text: 0.5}`):

```bash
mm train data/builtin.yaml train.lr=1e-3 data.batch_size=64 model.vision.patch_dropout=0.5 output_dir=runs/x
```

Unknown keys and bad values stop the run before any work, naming the key. `model` is a preset name (`mm models`),
a YAML/JSON file holding a `ModelConfig`, or an inline mapping; `model.KEY=VALUE` edits the chosen model.
`mm.create_model(name, **overrides)` takes the same model keys with `__` for dots (`vision__patch_dropout=0.5`).
"""


def config_markdown() -> str:
    lines = [CONFIG_INTRO]
    model_note = ("What `model` holds (`mm/models/config.py`, its stacks `mm/layers/config.py`); presets in "
                  "`mm/models/presets.py` are functions returning one. Keys below are relative to `model`.")
    for title, root, note in (
            ("Run config (`mm train`)", RunConfig,
             "The top-level keys of a run config file; defined in `mm/train/config.py` (the `eval` section in "
             "`mm/eval/config.py`)."),
            ("Model config (`model`)", ModelConfig, model_note)):
        seen: dict[type, list[str]] = {}
        order: list[type] = []
        _walk(root, "", seen, order)
        lines += [f"## {title}", "", note, ""]
        for cls in order:
            lines += list(_section(cls, seen[cls]))
    return "\n".join(lines).rstrip() + "\n"


# -- CLI reference -------------------------------------------------------------------------------------
def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    """(name, parser) of each subcommand, in the order they were added; aliases once."""
    out, ids = [], set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in ids:
                    ids.add(id(sub))
                    out.append((name, sub))
    return out


def commands(parser: argparse.ArgumentParser | None = None,
             prefix: str = "mm") -> list[tuple[str, argparse.ArgumentParser]]:
    """Every command as ("mm train", parser), nested subcommands included ("mm shards csv"), depth first."""
    if parser is None:
        parser = build_parser()
    out = []
    for name, sub in _subparsers(parser):
        out.append((f"{prefix} {name}", sub))
        out += commands(sub, f"{prefix} {name}")
    return out


@contextlib.contextmanager
def _plain_help() -> Iterator[None]:
    """argparse at a fixed width, without colour (Python 3.14 colours help on a terminal)."""
    saved = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR", "PYTHON_COLORS")}
    os.environ.update(COLUMNS=str(HELP_COLUMNS), NO_COLOR="1", PYTHON_COLORS="0")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def help_text(parser: argparse.ArgumentParser) -> str:
    with _plain_help():
        return parser.format_help().rstrip() + "\n"


def cli_markdown() -> str:
    top = build_parser()
    cmds = commands(top)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    lines = ["# Command-line reference", "",
             f"Generated by `python -m mm.cli.docs cli > docs/cli.md` (`make docs`) with Python {version}, from each",
             "command's `--help`; a test fails when this page is stale. Every command shows examples at the end of",
             "its description.", "",
             " ".join(f"[`{name}`](#{name.replace(' ', '-')})" for name, _ in cmds), "",
             "## mm", "", "```text", help_text(top).rstrip(), "```", ""]
    for name, p in cmds:
        lines += [f"{'###' if name.count(' ') > 1 else '##'} {name}", "", "```text", help_text(p).rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mm.cli.docs", description="Print a generated reference page.")
    p.add_argument("page", choices=["config", "cli"])
    args = p.parse_args(argv)
    sys.stdout.write(config_markdown() if args.page == "config" else cli_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
