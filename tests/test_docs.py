"""The generated references (docs/config.md, docs/cli.md) are current, every command's help shows an example,
and the documentation's links and files exist."""
from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import pytest
import yaml

from mm.cli import docs as _docs

ROOT = Path(__file__).resolve().parents[1]
STALE = "is stale: regenerate it with `make docs` (python -m mm.cli.docs {page} > docs/{page}.md)"


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == _docs.config_markdown(), "docs/config.md " + \
        STALE.format(page="config")


def test_config_reference_covers_every_key_with_its_comment():
    from mm.layers import MoEConfig
    from mm.train.config import RunConfig, TrainConfig

    text = _docs.config_markdown()
    for cls in (RunConfig, TrainConfig, MoEConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f"{cls.__name__}.{f.name}"
    # the comment on the field's line, and comment lines directly above it, are the description
    assert "| `steps` | `int` | `1000` | optimizer steps |" in text
    row = next(line for line in text.splitlines() if line.startswith("| `global_entropy_threshold` |"))
    assert "Nats: the global term is max(0, threshold - H)" in row and "`float \\| None`" in row


@dataclasses.dataclass
class _Demo:
    """A demo section."""

    a: int = 1  # beside a
    # above b,
    # two lines
    b: list = dataclasses.field(default_factory=list)  # and beside b
    # a comment followed by a blank line belongs to nothing

    c: str = "x"


def test_field_comments_reads_comments_above_and_beside_a_field():
    assert _docs.field_comments(_Demo) == {"a": "beside a", "b": "above b, two lines and beside b", "c": ""}
    rows = "\n".join(_docs._section(_Demo, ["demo."]))
    assert "Keys: `demo`." in rows and "A demo section." in rows
    assert "| `b` | `list` | `[]` | above b, two lines and beside b |" in rows


def _cli_sections(text: str) -> dict[str, str]:
    parts = re.split(r"^#{2,3} (mm[^\n]*)\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def test_cli_reference_is_current():
    doc, now = (ROOT / "docs" / "cli.md").read_text(), _docs.cli_markdown()
    made_with = re.search(r"with Python (\d+\.\d+)", doc)
    if made_with and made_with[1] == f"{sys.version_info.major}.{sys.version_info.minor}":
        assert doc == now, "docs/cli.md " + STALE.format(page="cli")
        return
    # another Python formats argparse help differently: check the content instead of the bytes
    sections = _cli_sections(doc)
    for name, parser in _docs.commands():
        assert name in sections, f"docs/cli.md has no section for {name!r}: " + STALE.format(page="cli")
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in sections[name], f"{name} {opt} missing in docs/cli.md: " + STALE.format(page="cli")


def test_every_command_is_documented_and_its_help_has_an_example():
    cmds = _docs.commands()
    names = [n for n, _ in cmds]
    for expected in ("mm train", "mm embed", "mm search", "mm zeroshot", "mm eval", "mm caption", "mm convert",
                     "mm shards csv", "mm shards img2dataset", "mm shards builtin", "mm shards extract"):
        assert expected in names
    for name, parser in cmds:
        text = _docs.help_text(parser)
        m = re.search(r"^examples?:(.*)", text, re.MULTILINE | re.DOTALL)
        assert m, f"`{name} --help` shows no example (end its description with 'example: {name} ...')"
        # an example runs this very command (directly, or under accelerate launch -m mm.cli)
        assert name in m[1] or f"-m mm.cli {name[3:]}" in m[1], f"`{name} --help`: no example of {name}"


def test_help_is_rendered_the_same_whatever_the_terminal(monkeypatch):
    parser = dict(_docs.commands())["mm caption"]
    texts = []
    for columns in ("40", "250"):
        monkeypatch.setenv("COLUMNS", columns)
        monkeypatch.setenv("FORCE_COLOR", "1")
        texts.append(_docs.help_text(parser))
    assert texts[0] == texts[1] and "\x1b[" not in texts[0]
    assert "--plot PNG" in texts[0] and "  --num-beams NUM_BEAMS\n" in texts[0]


def test_float_values_in_exponent_notation_are_numbers():
    from mm.config import ConfigError, apply_overrides, from_dict
    from mm.train.config import TrainConfig

    # PyYAML reads 1e-3 (no dot) as a string; config values and overrides accept it as a number
    train = apply_overrides(TrainConfig(), {"lr": "1e-3", "min_lr": "2E-5", "eps": "1.5e-8"})
    assert (train.lr, train.min_lr, train.eps) == (1e-3, 2e-5, 1.5e-8)
    assert from_dict(TrainConfig, yaml.safe_load("lr: 1e-3")).lr == 1e-3  # in a YAML file too
    with pytest.raises(ConfigError, match="lr: expected a number, got 'fast'"):
        apply_overrides(TrainConfig(), {"lr": "fast"})
    with pytest.raises(ConfigError, match="lr: expected a number, got 'nan'"):
        apply_overrides(TrainConfig(), {"lr": "nan"})  # only plain decimal / exponent notation


def test_mm_train_reports_a_config_error_in_one_line(capsys):
    from mm.cli import main

    assert main(["train", "train.nope=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'train.nope'") and "Traceback" not in err


def test_documentation_links_and_example_files_exist():
    pages = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "notebooks" / "README.md"]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target:
                continue
            assert (page.parent / target).exists(), f"{page.name} links to missing {target}"
    for name in ("concepts", "config", "cli", "data", "distributed", "troubleshooting"):
        assert f"docs/{name}.md" in (ROOT / "README.md").read_text()
    for cfg in sorted((ROOT / "docs" / "accelerate").glob("*.yaml")):
        data = yaml.safe_load(cfg.read_text())
        assert data["distributed_type"] == "MULTI_GPU" and data["num_processes"] >= 2, cfg.name
        from accelerate.commands.config.config_args import ClusterConfig

        ClusterConfig.from_yaml_file(str(cfg))  # how accelerate launch reads it (unknown keys raise)


def test_trainer_refuses_sharded_strategies(monkeypatch):
    from accelerate.utils import DistributedType

    from mm.train import trainer as loop
    from mm.train.config import RunConfig

    for kind in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        class FakeAccelerator:  # what Accelerator() is under `accelerate launch` with an FSDP / DeepSpeed config
            def __init__(self, kind=kind, **kw):
                self.distributed_type = kind

        monkeypatch.setattr("accelerate.Accelerator", FakeAccelerator)
        with pytest.raises(ValueError, match=f"{kind.value}, which mm's trainer does not take from accelerate.*train.fsdp=true.*docs/distributed.md"):
            loop.make_accelerator(RunConfig())
