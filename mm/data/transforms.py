"""Image transforms. Evaluation matches open_clip's preprocessing (bicubic shortest-side resize, center
crop, CLIP mean/std) so an imported model sees exactly the pixels it was trained on."""
from __future__ import annotations

from typing import Any

from torchvision import transforms as T

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


def image_transform(model_or_cfg: Any, train: bool = False, scale: tuple[float, float] = (0.9, 1.0)) -> T.Compose:
    """PIL image -> normalised (3, S, S) float tensor at the model's ``image_size``.

    ``train=True``: RandomResizedCrop over ``scale`` of the area (open_clip's default range), no flips
    (captions may say "left"/"right").
    """
    v = _vision_cfg(model_or_cfg)
    size = v.image_size
    norm = T.Normalize(mean=v.image_mean, std=v.image_std)
    if train:
        return T.Compose([
            T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
            _to_rgb, T.ToTensor(), norm,
        ])
    return T.Compose([
        T.Resize(size, interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        _to_rgb, T.ToTensor(), norm,
    ])
