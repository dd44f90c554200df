"""Post-training int8 quantization of a model's Linear layers, for inference: ``mm.quantize(model, mode)``.

Modes:

* ``"int8"`` -- dynamic quantization for CPU inference: int8 weights (symmetric, one scale per output
  channel) and activations quantized on the fly per call, an int8 x int8 -> int32 matmul, rescaled to
  float. Runs through torch's fbgemm / oneDNN kernels (``torch.ao.quantization.quantize_dynamic``): the only
  fast int8 CPU path torch itself ships. torch 2.14 marks ``torch.ao.quantization`` deprecated in favour of
  torchao (not a dependency here), so its warnings are silenced at this one call, and where the module is
  gone ``backend="mm"`` takes over: :class:`DynamicInt8Linear`, the same arithmetic (activations per row)
  on ``torch._int_mm`` -- correct everywhere, but on CPUs slower than fp32 (measured), so a fallback only.
* ``"int8-weight"`` -- weight-only int8 on any device (for GPUs: torch's own int8 weight-only kernels live
  in torchao): :class:`Int8WeightLinear` stores int8 weights and per-channel scales (a quarter of the fp32
  weight memory, half of bf16) and computes ``linear(x, q) * scale`` in the input's dtype. Saves memory,
  not time.

Every ``nn.Linear`` is replaced except MoE routers (they read their weight directly, in fp32). Patch and
token embeddings, norms and the logit scale stay as they are. A quantized model is for inference:
``save_pretrained`` it before quantizing, not after.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..hub.wrapped import refuse_wrapped

MODES = ("int8", "int8-weight")
_QMAX = 127  # symmetric int8: [-127, 127], so -x quantizes to -q


class QuantizeError(ValueError):
    """A mode or device that quantization cannot serve."""


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> int8 weight and float32 scales (out,): ``weight ~= q * scale[:, None]``."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / _QMAX
    q = torch.round(w / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return q, scale


class Int8WeightLinear(nn.Module):
    """A Linear whose weight is stored as int8 with one float32 scale per output channel. The scale is
    applied after the matmul (``x @ (q * s).T == (x @ q.T) * s``), so only an int8 -> dtype cast of the
    weight happens per call."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        q, scale = quantize_per_channel(linear.weight)
        self.register_buffer("weight", q.to(linear.weight.device))
        self.register_buffer("scale", scale.to(linear.weight.device))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, per-channel scales"


class DynamicInt8Linear(Int8WeightLinear):
    """Dynamic int8: each input row is quantized symmetrically with its own scale, multiplied with the int8
    weight in int32 (``torch._int_mm``) and rescaled by both scales."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, shape[-1]).float()
        xs = x2.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / _QMAX  # (rows, 1)
        xq = torch.round(x2 / xs).clamp_(-_QMAX, _QMAX).to(torch.int8)
        y = torch._int_mm(xq, self.weight.t()).float() * xs * self.scale
        if self.bias is not None:
            y = y + self.bias.float()
        return y.to(dtype).reshape(*shape[:-1], self.out_features)


def _targets(model: nn.Module) -> list[str]:
    """Names of the Linear modules to quantize: all but MoE routers."""
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and name.rsplit(".", 1)[-1] != "router"]


def _replace(model: nn.Module, names: list[str], make) -> None:
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, make(getattr(parent, leaf)))


def _ao_dynamic(model: nn.Module, names: list[str]) -> bool:
    """torch.ao's dynamic int8 on ``names`` (per-channel weights), in place; False when torch lacks it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the deprecation notice, once per call of these APIs
            from torch.ao.quantization import (
                per_channel_dynamic_qconfig,
                quantize_dynamic,
            )

            if not torch.backends.quantized.supported_engines or torch.backends.quantized.engine == "none":
                return False
            quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8, inplace=True)
    except (ImportError, AttributeError, RuntimeError):
        return False
    return True


def quantize(model: nn.Module, mode: str = "int8", *, inplace: bool = False, backend: str = "auto") -> nn.Module:
    """The model with its Linear layers quantized to int8 (see the module docstring for ``mode``), in eval
    mode. ``inplace=False`` quantizes a copy. ``backend`` (``"int8"`` only): ``"auto"`` (torch.ao's kernels
    where torch has them, else ``"mm"``), ``"torch.ao"`` or ``"mm"`` (:class:`DynamicInt8Linear`).
    ``model.quantization`` records the mode."""
    if mode not in MODES:
        raise QuantizeError(f"unknown quantization mode {mode!r}; choose one of {', '.join(MODES)}")
    if backend not in ("auto", "torch.ao", "mm"):
        raise QuantizeError(f"unknown backend {backend!r}; choose auto, torch.ao or mm")
    devices = {p.device.type for p in model.parameters()} | {b.device.type for b in model.buffers()}
    if mode == "int8" and devices - {"cpu"}:
        raise QuantizeError(f"int8 (dynamic) quantization runs on the CPU, the model is on {sorted(devices)}; "
                            "use int8-weight on a GPU")
    if getattr(model, "quantization", None):
        raise QuantizeError(f"the model is already quantized ({model.quantization})")
    refuse_wrapped(model, f"{mode} quantization")
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    names = _targets(model)
    if mode == "int8-weight":
        _replace(model, names, Int8WeightLinear)
    elif backend == "mm" or not _ao_dynamic(model, names):
        if backend == "torch.ao":
            raise QuantizeError("torch.ao.quantization's dynamic int8 is not available in this torch")
        _replace(model, names, DynamicInt8Linear)
    model.quantization = mode
    return model
