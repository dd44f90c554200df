"""Image transforms, written on PIL + torch directly.

Evaluation reproduces open_clip's preprocessing pixel for pixel (bicubic shortest-side resize, center
crop, CLIP mean/std; tested against open_clip's torchvision pipeline), so an imported model sees exactly
the pixels it was trained on. Not importing torchvision here keeps ``import mm`` ~3 s faster (torchvision
pulls in torch._dynamo), which every DataLoader worker and CLI call pays.
"""
from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..models import ModelConfig, VisionConfig


def _vision_cfg(model_or_cfg: Any) -> VisionConfig:
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    if isinstance(cfg, ModelConfig):
        return cfg.vision
    if isinstance(cfg, VisionConfig):
        return cfg
    raise TypeError(f"expected an mm model or config, got {type(model_or_cfg).__name__}")


class _ToNormalizedTensor:
    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).float().div(255)
        return x.sub_(self.mean).div_(self.std)


class EvalTransform(_ToNormalizedTensor):
    """Shortest side to ``size`` (bicubic), center crop ``size`` x ``size``, normalise."""

    def __init__(self, size: int, mean, std):
        super().__init__(mean, std)
        self.size = size

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``rng`` is accepted and unused (deterministic), so both transforms share one signature."""
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        if short != self.size:
            new_short, new_long = self.size, int(self.size * long / short)
            img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
        w, h = img.size
        s = self.size
        if w < s or h < s:  # pad like torchvision's CenterCrop, then crop
            canvas = Image.new(img.mode, (max(w, s), max(h, s)))
            canvas.paste(img, ((max(w, s) - w) // 2, (max(h, s) - h) // 2))
            img, (w, h) = canvas, canvas.size
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        if (w, h) != (s, s):
            img = img.crop((left, top, left + s, top + s))
        return super().__call__(img)


class TrainTransform(_ToNormalizedTensor):
    """RandomResizedCrop (area ``scale``, aspect 3/4–4/3, bicubic) -> tensor -> normalise.

    The crop is drawn from an explicit ``random.Random`` when one is passed, so the data pipeline can
    make augmentation a pure function of the sample's position (exact resume) without touching the
    global RNG that dropout uses. The sampling rule is torchvision's.
    """

    def __init__(self, size: int, mean, std, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__(mean, std)
        self.size, self.scale, self.ratio = size, scale, ratio

    def crop_params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        area = width * height
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(*log_r))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        i, j, h, w = self.crop_params(img.width, img.height, rng or random)
        img = img.crop((j, i, j + w, i + h)).resize((self.size, self.size), Image.BICUBIC)
        return super().__call__(img)


def image_transform(model_or_cfg: Any, train: bool = False, scale: tuple[float, float] = (0.9, 1.0)):
    """PIL image -> normalised (3, S, S) float tensor at the model's ``image_size``.

    ``train=True``: :class:`TrainTransform` (RandomResizedCrop over ``scale`` of the area, open_clip's
    default range; no flips: captions may say "left" or "right").
    """
    v = _vision_cfg(model_or_cfg)
    if train:
        return TrainTransform(v.image_size, v.image_mean, v.image_std, scale)
    return EvalTransform(v.image_size, v.image_mean, v.image_std)
