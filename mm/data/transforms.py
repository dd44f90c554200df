"""Image transforms. Evaluation matches open_clip's preprocessing (bicubic shortest-side resize, center
crop, CLIP mean/std) so an imported model sees exactly the pixels it was trained on."""
from __future__ import annotations

import math
import random
from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from ..config import ModelConfig, VisionConfig


def _to_rgb(img):
    return img.convert("RGB") if img.mode != "RGB" else img


def _vision_cfg(model_or_cfg: Any) -> VisionConfig:
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    if isinstance(cfg, ModelConfig):
        return cfg.vision
    if isinstance(cfg, VisionConfig):
        return cfg
    raise TypeError(f"expected an mm model or config, got {type(model_or_cfg).__name__}")


class TrainTransform:
    """RandomResizedCrop (area ``scale``, aspect 3/4–4/3, bicubic) -> tensor -> normalise.

    Unlike torchvision's, the crop is drawn from an explicit ``random.Random`` when one is passed, so
    the data pipeline can make augmentation a pure function of the sample's position (exact resume)
    without touching the global torch RNG that dropout uses.
    """

    def __init__(self, size: int, mean, std, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.mean, self.std = list(mean), list(std)

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
        # fallback: central crop at the clamped aspect ratio (as torchvision does)
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            h, w = height, int(round(height * self.ratio[1]))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        img = _to_rgb(img)
        i, j, h, w = self.crop_params(img.width, img.height, rng or random)
        img = TF.resized_crop(img, i, j, h, w, [self.size, self.size], interpolation=T.InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(img), self.mean, self.std)


def image_transform(model_or_cfg: Any, train: bool = False, scale: tuple[float, float] = (0.9, 1.0)):
    """PIL image -> normalised (3, S, S) float tensor at the model's ``image_size``.

    ``train=True``: :class:`TrainTransform` (RandomResizedCrop over ``scale`` of the area, open_clip's
    default range; no flips, captions may say "left"/"right").
    """
    v = _vision_cfg(model_or_cfg)
    size = v.image_size
    if train:
        return TrainTransform(size, v.image_mean, v.image_std, scale)
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        _to_rgb, T.ToTensor(), T.Normalize(mean=v.image_mean, std=v.image_std),
    ])
