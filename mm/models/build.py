"""From a name, a file, a dict or a config object to a model: ``resolve_config`` and ``build_model``.

Weights are not this layer's business: ``mm.create_model`` (``mm.hub``) also loads saved directories and
weights files, through this module. Nor are other libraries' formats: open_clip's registry names and config dicts
resolve through the preset source ``mm.hub`` registers (:func:`mm.models.presets.register_source`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import ConfigError, apply_overrides, from_dict, load_file, validate
from .clip import CLIP, CoCa, ImageTextModel
from .config import ModelConfig
from .limoe import LIMoE
from .presets import get_preset, source_names, translate_config
from .presets import list_models as mm_presets


def list_models() -> list[str]:
    """Every model name mm builds from a name: mm's own presets and open_clip's registry (``ViT-B-32``,
    ``ViT-SO400M-14-SigLIP``, ...; those mm does not build natively run through open_clip, ``mm.create_model``)."""
    own = mm_presets()
    return own + sorted(set(source_names()) - set(own))


def _is_name(spec: str) -> bool:
    return spec in mm_presets() or spec in source_names()


def _flatten_overrides(overrides: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``vision={"patch_dropout": .5}`` and ``vision__patch_dropout=.5`` both become ``vision.patch_dropout``."""
    flat = {}
    for k, v in overrides.items():
        key = prefix + k.replace("__", ".")
        if isinstance(v, dict):
            flat.update(_flatten_overrides(v, key + "."))
        else:
            flat[key] = v
    return flat


def resolve_config(spec: str | Path | dict | ModelConfig, **overrides: Any) -> ModelConfig:
    """A preset name (mm's or a registered source's: open_clip's registry), a YAML/JSON file, a dict or a
    ModelConfig -> validated ModelConfig. A dict or JSON file in a source's format (open_clip's model config) is
    translated. An open_clip model mm does not build natively raises ``NotNative`` (a ConfigError)."""
    if isinstance(spec, ModelConfig):
        cfg = spec
    elif isinstance(spec, dict) and (foreign := translate_config(spec)) is not None:
        cfg = foreign
    elif isinstance(spec, dict):
        cfg = from_dict(ModelConfig, spec)
    elif isinstance(spec, (str, Path)) and _is_name(str(spec)):
        cfg = get_preset(str(spec))
    elif isinstance(spec, (str, Path)) and Path(spec).is_file():
        data = load_file(spec)
        try:
            foreign = translate_config(data)
        except ConfigError as e:  # NotNative stays NotNative
            raise type(e)(f"{spec}: {e}") from None
        if foreign is not None:
            return apply_overrides(foreign, _flatten_overrides(overrides)) if overrides else foreign
        cfg = from_dict(ModelConfig, data.get("model", data) if "model" in data and isinstance(data["model"], dict) else data)
    else:
        raise ConfigError(
            f"unknown model {str(spec)!r}: not a preset ({', '.join(mm_presets())}), not a model of open_clip's "
            "registry (mm.list_models() lists both) and not a config file")
    if overrides:
        return apply_overrides(cfg, _flatten_overrides(overrides))
    return validate(cfg)


def model_class(cfg: ModelConfig) -> type[ImageTextModel]:
    """LIMoE for a one-tower config, CoCa when the config has a captioning decoder, else CLIP."""
    if cfg.one_tower is not None:
        return LIMoE
    return CoCa if cfg.decoder is not None else CLIP


def build_model(spec: str | Path | dict | ModelConfig, **overrides: Any) -> ImageTextModel:
    """A randomly initialised model of the architecture ``spec`` names (see :func:`resolve_config`)."""
    cfg = resolve_config(spec, **overrides)
    return model_class(cfg)(cfg)
