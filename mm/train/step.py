"""The numerics of one optimizer step, shared by the trainer and ``mm finetune``: the forward's autocast, the
fp16 gradient scaler, clipping (or measuring) the gradient norm, and what happens to a step whose loss or
gradients are not finite.

Policy for a non-finite step: it is skipped (no optimizer update; fp16's scaler skips it itself and lowers its
scale) and counted; ``max_bad_steps`` of them in a row stop the run with :class:`TrainingError` (fp16 gets 16
more: the scaler's first steps calibrate its scale by overflowing). The finite test is one host sync per step,
needed because every process must take the same decision: the norm is the all-reduced one, equal everywhere.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..utils.precision import autocast
from .fsdp import plain
from .optim import clip_grad_norm, grad_norm

FP16_CALIBRATION_STEPS = 16


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""


class Stepper:
    """``with stepper.autocast(): loss = ...``; ``stepper.backward(loss)`` (per micro-batch);
    ``stepper.step(n)`` once per optimizer step: returns whether the step was taken (finite)."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter], *, device: torch.device,
                 precision: str = "fp32", grad_clip: float | None = None, max_bad_steps: int = 5,
                 lr_hint: str = "train.lr", log=print):
        self.optimizer, self.params, self.device = optimizer, list(params), torch.device(device)
        self.precision, self.grad_clip, self.lr_hint, self.log = precision, grad_clip, lr_hint, log
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None
        self.max_bad = max_bad_steps + (FP16_CALIBRATION_STEPS if self.scaler is not None else 0)
        self.bad_in_row, self.skipped = 0, 0
        self.norm: torch.Tensor | None = None  # the last step's gradient norm (before clipping)

    def autocast(self):
        return autocast(self.device, self.precision)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` as it is back-propagated: times the fp16 scaler's scale (unchanged without fp16)."""
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss: torch.Tensor) -> None:
        self.scale(loss).backward()

    def step(self, step: int) -> bool:
        """Clip (or measure) the gradients, update unless they are non-finite, zero them; ``step`` (the number
        this step will have) only names it in messages. Raises TrainingError after too many bad steps."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # the norm and the clipping need the true gradients
        if self.grad_clip:
            self.norm = clip_grad_norm(self.params, self.grad_clip)
        else:
            self.norm = grad_norm(self.params)
        finite = bool(torch.isfinite(plain(self.norm)))  # one host sync per step: the skip decision needs it
        if self.scaler is not None:  # the scaler skips overflowing steps itself
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if finite:
            self.bad_in_row = 0
            return True
        self.skipped += 1
        self.bad_in_row += 1
        self.log(f"step {step}: non-finite loss or gradients; step skipped ({self.bad_in_row} in a row)")
        if self.bad_in_row >= self.max_bad:
            raise TrainingError(f"{self.bad_in_row} steps in a row had non-finite loss or gradients "
                                f"(last at step {step}); lower {self.lr_hint} or check the data")
        return False

    def state_dict(self) -> dict:
        """The skip counters and the fp16 scaler: what a resumed run continues from."""
        state = {"skipped_steps": self.skipped, "bad_in_row": self.bad_in_row}
        return {**state, "scaler": self.scaler.state_dict()} if self.scaler is not None else state

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.bad_in_row = int(state.get("skipped_steps", 0)), int(state.get("bad_in_row", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
