"""LoRA adapters on disk, in Hugging Face peft's layout, and their base models.

An adapter directory holds

* ``adapter_config.json`` — peft's ``LoraConfig`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``lora_dropout``,
  ``target_modules``: the adapted layers' full module names, ``base_model_name_or_path``: the base model spec);
* ``adapter_model.safetensors`` — the adapter tensors under peft's names
  (``base_model.model.<layer>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(base_mm_model, DIR)``
  reads it (tested) — except MoE expert adapters, which peft's layout has no name for (mm's own names);
* ``mm_adapter.json`` — what mm checks before using it: the base model spec, the SHA-256 of the base weights
  the adapter was trained on, the base model config, mm's LoRA config and the adapted layers.

``load_adapter(model, DIR)`` adds the adapters to a base model (checking the base first); ``merge_lora``
(``mm.layers.lora``) folds them into the weights.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, from_dict, to_dict, validate
from ..layers.config import LoraConfig
from ..layers.lora import (
    LoraError,
    LoRALinear,
    adapted_layers,
    add_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    lora_tensor_shapes,
)
from ..utils.io import atomic_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MM_ADAPTER = "mm_adapter.json"
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """An adapter directory that is incomplete, or an adapter that does not fit the base model it is put on."""


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / MM_ADAPTER).is_file() or (Path(path) / ADAPTER_CONFIG).is_file()


def base_sha256(model: nn.Module) -> str:
    """SHA-256 over the base weights (every tensor but the adapters', by name, in fp32): what an adapter was
    trained on, recorded in it and checked when it is put on a base."""
    h = hashlib.sha256()
    adapters = lora_parameters(model)  # found by module type
    for name, t in sorted(model.state_dict().items()):
        if name in adapters:
            continue
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _peft_name(name: str) -> str:
    """mm's adapter tensor name -> peft's (``...qkv.lora_A.weight`` keeps its name under peft's prefix)."""
    return PEFT_PREFIX + name


def save_adapter(model: nn.Module, directory: str | Path, lora: LoraConfig, *, base: str | None,
                 base_hash: str) -> Path:
    """Write the adapters of ``model`` (and nothing of its base) into ``directory``. ``base``: the base model
    spec (an mm model directory, ``open_clip:NAME[:TAG]``, a preset); ``base_hash``: ``base_sha256`` of the
    base before training (the frozen base does not change, so it is also the hash of the model's base now)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    layers = adapted_layers(model)
    if not layers:
        raise AdapterError("the model carries no adapter to save")
    tensors = {_peft_name(k): v.detach().contiguous().cpu() for k, v in lora_state_dict(model).items()}
    peft_cfg = {
        "peft_type": "LORA", "task_type": None, "r": lora.rank, "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
        "target_modules": [n for n, m in lora_modules(model) if isinstance(m, LoRALinear)],  # peft has no expert layer
        "base_model_name_or_path": base, "revision": None,
    }
    mm_meta = {"format_version": FORMAT_VERSION, "base": base, "base_sha256": base_hash,
               "model": to_dict(model.config), "lora": to_dict(lora), "layers": layers,
               "weights": ADAPTER_WEIGHTS}
    with atomic_path(d / MM_ADAPTER) as tmp_m, atomic_path(d / ADAPTER_CONFIG) as tmp_c, \
            atomic_path(d / ADAPTER_WEIGHTS) as tmp_w:
        save_file(tensors, str(tmp_w), metadata={"format": "pt"})
        tmp_c.write_text(json.dumps(peft_cfg, indent=2))
        tmp_m.write_text(json.dumps(mm_meta, indent=2))
    return d


def read_adapter_meta(directory: str | Path) -> dict[str, Any]:
    """``mm_adapter.json`` of an adapter directory, with its LoRA config validated (``meta["lora"]``)."""
    d = Path(directory)
    path = d / MM_ADAPTER
    if not path.is_file():
        what = "a peft adapter without mm's" if (d / ADAPTER_CONFIG).is_file() else "not an adapter directory:"
        raise AdapterError(f"{d}: {what} {MM_ADAPTER} (written by mm's LoRA training and `mm merge`'s input)")
    try:
        meta = json.loads(path.read_text())
        meta["lora"] = validate(from_dict(LoraConfig, meta["lora"]))
        for key in ("base_sha256", "layers", "model"):
            meta[key]  # noqa: B018 - presence check
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise AdapterError(f"{path}: not a valid adapter description ({type(e).__name__}: {e})") from None
    except ConfigError as e:
        raise AdapterError(f"{path}: {e}") from None
    if not (d / ADAPTER_WEIGHTS).is_file():
        raise AdapterError(f"{d / ADAPTER_WEIGHTS}: missing adapter weights file")
    return meta


def load_adapter(model: nn.Module, directory: str | Path, *, check_base: bool = True) -> nn.Module:
    """Put the adapter saved in ``directory`` on ``model`` (its base), unmerged, in place. Before anything is
    changed: every adapted layer must exist with the adapter's shapes, and (``check_base``) the model's weights
    must be the ones the adapter was trained on (SHA-256); errors name the directory and the mismatch."""
    from safetensors.torch import load_file

    d = Path(directory)
    meta = read_adapter_meta(d)
    # the architecture first (another one is named as such), then the weights (the same one, trained otherwise)
    sd = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(d / ADAPTER_WEIGHTS)).items()}
    want = _adapter_shapes(model, list(meta["layers"]), meta["lora"].rank, d)
    for k, shape in want.items():
        if k not in sd:
            raise AdapterError(f"{d / ADAPTER_WEIGHTS}: no tensor for {k}")
        if tuple(sd[k].shape) != shape:
            raise AdapterError(f"{d / ADAPTER_WEIGHTS}: {k} has shape {tuple(sd[k].shape)}, this model's layer "
                               f"needs {shape} (an adapter of another architecture?)")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise AdapterError(f"{d / ADAPTER_WEIGHTS}: unexpected tensor {extra[0]}")
    if check_base:
        have = base_sha256(model)
        if have != meta["base_sha256"]:
            raise AdapterError(
                f"{d}: trained on other base weights than this model's (base {meta.get('base')!r}, SHA-256 "
                f"{meta['base_sha256'][:12]}..., this model {have[:12]}...); use the base it names")
    add_lora(model, meta["lora"], targets=list(meta["layers"]))  # checked above: nothing can fail half-way
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k in sd:
                p.copy_(sd[k])
    return model


def _adapter_shapes(model: nn.Module, layers: list[str], rank: int, d: Path) -> dict[str, tuple[int, ...]]:
    """The adapter tensors (mm names) and shapes that ``layers`` of ``model`` need at ``rank``; AdapterError
    naming a layer this model does not have or that is not adaptable."""
    try:
        return lora_tensor_shapes(model, layers, rank)
    except LoraError as e:
        raise AdapterError(f"{d}: adapted {e} (another architecture?)") from None
