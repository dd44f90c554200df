"""An exponential-moving-average teacher: a frozen copy of (part of) the student whose weights follow the
student's, ``teacher = m * teacher + (1 - m) * student`` after every optimizer step, with the momentum ``m`` rising
from ``start`` to ``end`` on a cosine over the run (DINO / iBOT / SILC / SigLIP 2's self-distillation teacher).

The teacher never trains (no gradient, eval mode); a task that uses it saves and loads it with its own state
(:meth:`EmaTeacher.save` / :meth:`load`: ``ema_teacher.safetensors`` in the checkpoint directory), so a resumed run
continues it exactly. Building block of the SigLIP 2 recipe's self-distillation and masked-prediction objectives.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
from torch import nn

STATE_NAME = "ema_teacher.safetensors"


def ema_momentum(step: int, total: int, start: float = 0.996, end: float = 1.0) -> float:
    """The momentum after optimizer step ``step`` of ``total``: ``end - (end - start) * (cos(pi * step / total) + 1)
    / 2`` (``start`` at step 0, ``end`` at the last)."""
    if total < 1:
        raise ValueError(f"total must be >= 1, got {total}")
    if not 0.0 <= start <= end <= 1.0:
        raise ValueError(f"momenta must satisfy 0 <= start <= end <= 1, got {start}, {end}")
    t = min(max(step, 0), total) / total
    return end - (end - start) * (math.cos(math.pi * t) + 1) / 2


class EmaTeacher:
    """``EmaTeacher(student_module, total_steps)``; ``update(step)`` after each optimizer step; ``module`` is the
    teacher (call it under ``torch.no_grad()``). Floating-point tensors follow the student in fp32 arithmetic;
    buffers that are not floating point are copied."""

    def __init__(self, student: nn.Module, total_steps: int, start: float = 0.996, end: float = 1.0):
        ema_momentum(0, total_steps, start, end)  # checks the settings
        self.student, self.total, self.start, self.end = student, total_steps, start, end
        self.module = copy.deepcopy(student).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, step: int) -> float:
        """Move the teacher towards the student with the momentum of ``step``; returns that momentum."""
        m = ema_momentum(step, self.total, self.start, self.end)
        teacher = self.module.state_dict()
        for name, s in self.student.state_dict().items():
            t = teacher[name]
            if t.is_floating_point():
                t.copy_((m * t.float() + (1.0 - m) * s.detach().float()).to(t.dtype))
            else:
                t.copy_(s)
        return m

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.module.state_dict().items()}
        save_file(state, str(Path(directory) / STATE_NAME))

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the checkpoint was written without the EMA teacher")
        self.module.load_state_dict(load_file(str(path)))
