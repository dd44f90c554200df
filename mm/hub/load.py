"""Models with their weights: ``create_model`` (the public constructor) and ``load_model`` (what every command's
``--model`` names, and a config's ``train.init_from`` / ``distill.teacher``)."""
from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, load_file
from ..models import ImageTextModel, ModelConfig, NotNative, build_model
from .adapter import AdapterError, is_adapter_dir, load_adapter, read_adapter_meta
from .open_clip import from_open_clip
from .open_clip_configs import (
    is_open_clip_config,
    open_clip_model_names,
    registry_config,
)
from .pretrained import (
    PretrainedError,
    load_pretrained,
    load_weights,
    read_weights_file,
)
from .spec import parse_spec
from .wrapped import OpenClipModel, build_open_clip, refuse_wrapped, wrap_open_clip


def _open_clip_dict(spec: Any) -> dict | None:
    """The open_clip config dict ``spec`` names (a registry name, a dict or JSON file in open_clip's format)."""
    if isinstance(spec, dict):
        return spec if is_open_clip_config(spec) else None
    if isinstance(spec, str) and spec in open_clip_model_names():
        return registry_config(spec)
    if isinstance(spec, (str, Path)) and Path(spec).is_file():
        data = load_file(spec)
        return data if is_open_clip_config(data) else None
    return None


def create_model(spec: str | Path | dict | ModelConfig, pretrained: str | Path | None = None,
                 **overrides: Any) -> ImageTextModel | OpenClipModel:
    """Build a model from a preset name, a config file, a dict or a config object: randomly initialised,
    or with the weights of ``pretrained`` (an mm or open_clip ``.safetensors`` / ``.pt`` / ``.bin`` file;
    open_clip state dicts are converted exactly, pickles that would run code are refused).

    A directory made by :func:`mm.save_pretrained` loads that model (weights included). Overrides use
    dotted keys with ``__`` or nested dicts: ``create_model("tiny-clip", vision__patch_dropout=0.5)``. Every
    model of open_clip's registry is a name here, and a dict or JSON file in open_clip's config format is a spec;
    one mm does not build natively comes back as open_clip's own model behind mm's interface
    (:class:`~mm.hub.wrapped.OpenClipModel`; no overrides then).
    """
    if isinstance(spec, (str, Path)) and Path(spec).is_dir():
        if overrides or pretrained is not None:
            raise ConfigError("overrides and pretrained= cannot be applied when loading a saved model directory")
        return load_pretrained(spec)
    try:
        model = build_model(spec, **overrides)
    except NotNative:
        oc = _open_clip_dict(spec)
        if overrides or oc is None:
            raise
        model = wrap_open_clip(build_open_clip(oc), spec if isinstance(spec, str) and spec in open_clip_model_names() else oc)
    if pretrained is not None:
        load_weights(model, pretrained)
    return model


def load_model(spec: str | Path, pretrained: str | Path | None = None, device: str | torch.device = "cpu",
               warn_random: bool = True, adapter: str | Path | None = None,
               names: Mapping[str, str] | None = None) -> ImageTextModel:
    """The model ``spec`` names (a command's ``--model``, ``distill.teacher``), in eval mode on ``device``:

    * an mm model directory (``save_pretrained`` / a run's ``final/``);
    * ``open_clip:NAME`` or ``open_clip:NAME:TAG``: built with open_clip's own registry (TAG: one of its
      pretrained tags, downloaded into its cache when the network allows) and converted exactly;
    * a preset name or config file, with ``pretrained`` an mm or open_clip weights file; without one
      the weights are random (a warning says so);
    * a LoRA adapter directory (a LoRA run's ``final/``): its base model (recorded in it) with the adapter.

    ``adapter``: a LoRA adapter directory put on the model unmerged (its base weights checked).

    ``names``: what the caller calls ``spec`` / ``pretrained`` / ``adapter``, for the messages (default: these
    parameter names; the commands pass ``--model`` / ``--pretrained`` / ``--adapter``, a config its keys).
    """
    n = {"spec": "spec", "pretrained": "pretrained", "adapter": "adapter", **(names or {})}
    s = parse_spec(spec)
    if s.kind == "dir" and is_adapter_dir(s.text) and not (s.path / "config.json").is_file():
        if adapter is not None:
            raise AdapterError(f"{s.text} is an adapter directory; give its base as {n['spec']} and it as "
                               f"{n['adapter']}")
        base = read_adapter_meta(s.text)["base"]
        if base is None:
            raise AdapterError(f"{s.text}: the adapter names no base model (trained from random weights); "
                               f"give the base as {n['spec']} and the adapter as {n['adapter']}")
        return load_model(base, pretrained, device, warn_random, adapter=s.text, names=names)
    if s.kind == "dir":
        if pretrained is not None:
            raise PretrainedError(f"{s.text} is a model directory and holds its weights; drop {n['pretrained']}")
        model = load_pretrained(s.text)
    elif s.kind == "open_clip":
        import open_clip

        oc = open_clip.create_model(s.name, pretrained=s.tag, device="cpu")
        if pretrained is not None:
            oc.load_state_dict(read_weights_file(pretrained), strict=True)
        try:
            model = from_open_clip(oc, s.name)
        except NotNative:  # mm does not build it: open_clip's own model runs behind mm's interface
            model = wrap_open_clip(oc, s.name)
    else:
        model = create_model(s.text)
        if pretrained is not None:
            load_weights(model, pretrained)
        elif warn_random:
            print(f"warning: {s.text!r} is not a model directory and no {n['pretrained']} file was given: random "
                  "weights", file=sys.stderr)
    if adapter is not None:
        refuse_wrapped(model, f"an adapter ({n['adapter']})")
        load_adapter(model, adapter)
    return model.to(device).eval()
