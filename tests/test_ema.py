"""The EMA teacher (mm/train/tasks/ema.py): the momentum schedule's ends and shape, the update against the formula
written out here, no gradient, and save / load resuming it exactly."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mm.train.tasks.ema import EmaTeacher, ema_momentum


def test_the_momentum_rises_from_start_to_end_on_a_cosine():
    assert ema_momentum(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert ema_momentum(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert ema_momentum(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    values = [ema_momentum(s, 100, 0.9, 0.999) for s in range(101)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert ema_momentum(25, 100, 0.9, 1.0) == pytest.approx(1.0 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    for bad in ((0, 0, 0.9, 1.0), (0, 10, 1.0, 0.9), (0, 10, -0.1, 1.0)):
        with pytest.raises(ValueError):
            ema_momentum(*bad)


def _student() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))


def test_the_teacher_follows_the_formula_and_takes_no_gradient():
    student = _student()
    ema = EmaTeacher(student, total_steps=10, start=0.9, end=1.0)
    assert all(not p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student(torch.randn(6, 4))  # moves the BatchNorm statistics and its counter
    m = ema.update(3)
    assert m == pytest.approx(ema_momentum(3, 10, 0.9, 1.0))
    for k, s in student.state_dict().items():
        t = ema.module.state_dict()[k]
        if s.is_floating_point():
            torch.testing.assert_close(t, m * before[k] + (1 - m) * s, rtol=0, atol=1e-6)
            assert not torch.equal(t, s) and not torch.equal(t, before[k])
        else:
            assert torch.equal(t, s)  # num_batches_tracked is copied
    held = {k: v.clone() for k, v in ema.module.state_dict().items() if v.is_floating_point()}
    assert ema.update(10) == 1.0  # momentum 1 at the end: the teacher no longer moves
    assert all(torch.equal(ema.module.state_dict()[k], v) for k, v in held.items())


def test_save_and_load_resume_the_teacher_exactly(tmp_path):
    student = _student()
    ema = EmaTeacher(student, total_steps=10)
    with torch.no_grad():
        student[0].weight.add_(1.0)
    ema.update(2)
    ema.save(tmp_path)
    other = EmaTeacher(_student(), total_steps=10)
    other.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(ema.module.state_dict().values(), other.module.state_dict().values(),
                                                   strict=True))
    with pytest.raises(FileNotFoundError, match="ema_teacher.safetensors: missing"):
        other.load(tmp_path / "nowhere")
