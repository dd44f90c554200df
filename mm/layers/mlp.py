"""Feed-forward layers: the classic two-layer MLP (GELU / QuickGELU / ...) and SwiGLU."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_act(name: str) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    if name == "quick_gelu":
        return QuickGELU()
    if name == "silu":
        return nn.SiLU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown activation {name!r}")


def _sub_norm(hidden: int, eps: float | None) -> nn.Module:
    """The optional LayerNorm on an FFN's hidden activations (sub-LN); ``eps`` None = none."""
    return nn.LayerNorm(hidden, eps=eps) if eps is not None else nn.Identity()


class Mlp(nn.Module):
    """Linear -> activation [-> LayerNorm (sub-LN, ``norm_eps``)] -> Linear."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu", norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_act(act)
        self.norm = _sub_norm(hidden, norm_eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.act(self.fc1(x))))


class SwiGLU(nn.Module):
    """silu(x W_gate) * (x W_up) [-> LayerNorm (sub-LN, ``norm_eps``: EVA02)] -> W_down (Shazeer 2020). Gate and
    up projections are packed into one matmul (``fc1`` outputs [gate | up])."""

    def __init__(self, dim: int, hidden: int, norm_eps: float | None = None):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.norm = _sub_norm(hidden, norm_eps)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(self.norm(F.silu(gate) * up))
