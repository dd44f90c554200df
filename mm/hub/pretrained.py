"""save_pretrained / load_pretrained: ``config.json`` + ``model.safetensors``; weights files; loading never
unpickles."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from ..config import ConfigError, from_dict, to_dict, validate
from ..models import ModelConfig, model_class
from ..utils.io import atomic_path, sha256_file
from .open_clip import ConversionError, convert_state_dict
from .wrapped import OpenClipModel, WrappedConfig, build_open_clip

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class PretrainedError(RuntimeError):
    """A saved model directory is missing a file, or a file does not match what was saved."""


def save_pretrained(model: torch.nn.Module, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    Files are written under temporary names and renamed, so an interrupted save never leaves a
    directory that looks complete. The weights' SHA-256 goes into config.json so that loading detects
    a changed or truncated weights file.
    """
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # the weights are renamed into place first, then the config that records their hash
    with atomic_path(d / CONFIG_NAME) as tmp_c, atomic_path(d / WEIGHTS_NAME) as tmp_w:
        save_file(state, str(tmp_w), metadata={"format": "mm", "format_version": str(FORMAT_VERSION)})
        # a model mm runs through open_clip keeps its open_clip config (to rebuild it), under its own key
        key = "wrapped" if isinstance(model.config, WrappedConfig) else "model"
        meta = {
            "format_version": FORMAT_VERSION,
            key: to_dict(model.config),
            "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(tmp_w)},
        }
        tmp_c.write_text(json.dumps(meta, indent=2))
    return d


def load_config(directory: str | Path) -> ModelConfig | WrappedConfig:
    """The validated config stored in ``directory/config.json``: an mm ModelConfig, or the WrappedConfig of an
    open_clip model mm runs through open_clip."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise PretrainedError(f"{path}: missing (not an mm model directory? expected {CONFIG_NAME} + {WEIGHTS_NAME})")
    try:
        meta = json.loads(path.read_text())
        if "wrapped" in meta:
            return validate(from_dict(WrappedConfig, meta["wrapped"]))
        return validate(from_dict(ModelConfig, meta["model"]))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PretrainedError(f"{path}: not a valid mm config ({type(e).__name__}: {e})") from e
    except ConfigError as e:
        raise PretrainedError(f"{path}: {e}") from e


def load_pretrained(directory: str | Path, device: str | torch.device = "cpu", verify: bool = True) -> torch.nn.Module:
    """Rebuild the model saved by :func:`save_pretrained`. ``verify`` checks the weights' SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    d = Path(directory)
    cfg = load_config(d)
    meta = json.loads((d / CONFIG_NAME).read_text())
    wpath = d / meta.get("weights", {}).get("file", WEIGHTS_NAME)
    if not wpath.is_file():
        raise PretrainedError(f"{wpath}: missing weights file")
    expected = meta.get("weights", {}).get("sha256")
    if verify and expected and sha256_file(wpath) != expected:
        raise PretrainedError(
            f"{wpath}: SHA-256 differs from the one recorded in {d / CONFIG_NAME}; the file was changed or "
            "truncated after saving (pass verify=False to load it anyway)"
        )
    try:
        state = load_file(str(wpath), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise PretrainedError(f"{wpath}: not a readable safetensors file ({e})") from e
    model = OpenClipModel(build_open_clip(cfg.open_clip_config), cfg) if isinstance(cfg, WrappedConfig) \
        else model_class(cfg)(cfg)
    load_state_dict_checked(model, state, source=str(wpath))
    return model.to(device)


def load_state_dict_checked(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the first offending key and shapes."""
    own = model.state_dict()
    for k, v in own.items():
        if k not in state:
            raise PretrainedError(f"{source}: missing tensor {k!r} (expected shape {tuple(v.shape)})")
        if tuple(state[k].shape) != tuple(v.shape):
            raise PretrainedError(
                f"{source}: tensor {k!r} has shape {tuple(state[k].shape)}, the model expects {tuple(v.shape)}"
            )
    extra = sorted(set(state) - set(own))
    if extra:
        raise PretrainedError(f"{source}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
    model.load_state_dict(state, strict=True)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors``, or from a ``.pt`` / ``.bin`` / ``.pth`` checkpoint read with
    ``torch.load(weights_only=True)``: tensors and plain containers only, so a file that would run code
    when unpickled is refused rather than executed. Training checkpoints (``{"state_dict": ...}``,
    DDP's ``module.`` prefixes) are unwrapped."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise PretrainedError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise PretrainedError(
            f"{path}: refused: the file holds Python objects other than tensors, and unpickling them could run "
            f"arbitrary code (torch.load weights_only=True said: {str(e).splitlines()[0]})") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise PretrainedError(f"{path}: not a readable torch checkpoint ({e})") from e
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise PretrainedError(f"{path}: expected a state dict (names -> tensors), got {type(sd).__name__}")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a weights file into ``model``: an mm state dict as it is, an open_clip one (recognised by its
    keys) converted exactly, into a model mm runs through open_clip unconverted; errors name the file and the
    first offending tensor."""
    sd = read_weights_file(path)
    if isinstance(model, OpenClipModel):  # open_clip's own module: its checkpoint loads as it is, under ``model.``
        sd = {k if k.startswith("model.") else f"model.{k}": v for k, v in sd.items()}
    elif set(sd) != set(model.state_dict()):
        try:
            sd = convert_state_dict(sd, model.config)
        except ConversionError as e:
            raise PretrainedError(f"{path}: neither an mm nor a matching open_clip state dict: {e}") from None
    load_state_dict_checked(model, sd, source=str(path))
    return model
