"""The one reader of what ``--model``, ``train.init_from`` and ``distill.teacher`` name.

A spec is an mm model directory (``save_pretrained``, a run's ``final/``), ``open_clip:NAME[:TAG]`` (a model
of open_clip's registry, TAG one of its pretrained weights), a preset name, or a file (a model config, or a
weights file: the caller knows which it expects).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models import list_models

OPEN_CLIP_PREFIX = "open_clip:"
KINDS = ("dir", "open_clip", "preset", "file", "missing")


@dataclass(frozen=True)
class ModelSpec:
    text: str  # as given
    kind: str  # one of KINDS: "missing" = none of the others (no such directory, preset or file)
    name: str = ""  # open_clip: the model name
    tag: str | None = None  # open_clip: the pretrained tag, None for random weights

    @property
    def path(self) -> Path:
        return Path(self.text)


def parse_spec(spec: str | Path) -> ModelSpec:
    """What ``spec`` names (see the module docstring). Nothing is loaded; only the file system is looked at."""
    text = str(spec)
    if text.startswith(OPEN_CLIP_PREFIX):
        name, _, tag = text[len(OPEN_CLIP_PREFIX):].partition(":")
        return ModelSpec(text, "open_clip", name, tag or None)
    path = Path(text)
    if path.is_dir():
        return ModelSpec(text, "dir")
    if text in list_models():
        return ModelSpec(text, "preset")
    return ModelSpec(text, "file" if path.is_file() else "missing")
