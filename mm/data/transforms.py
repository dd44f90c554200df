"""Image transforms, written on PIL + torch directly.

Evaluation reproduces open_clip's eval preprocessing pixel for pixel for every ``VisionConfig.resize_mode``
(open_clip's ``resize_mode``: ``shortest`` = shortest side to the size then center crop, ``longest`` =
longest side to the size then pad to a square with black, ``squash`` = both sides to the size) and
``interpolation`` (``bicubic`` / ``bilinear``, PIL's antialiased filters, as torchvision uses on PIL images),
with the CLIP mean/std; tested against open_clip's torchvision pipeline, so an imported model sees exactly
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
from ..models.patches import Patches, patchify

# torchvision's InterpolationMode -> PIL mapping for the two modes open_clip offers
_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def _vision_cfg(model_or_cfg: Any) -> VisionConfig:
    cfg = getattr(model_or_cfg, "config", model_or_cfg)
    if isinstance(cfg, VisionConfig):
        return cfg
    if isinstance(cfg, ModelConfig) or isinstance(getattr(cfg, "vision", None), VisionConfig):
        return cfg.vision  # an mm model's config, or the config of an open_clip model mm runs through open_clip
    raise TypeError(f"expected an mm model or config, got {type(model_or_cfg).__name__}")


def _resample(interpolation: str) -> int:
    if interpolation not in _RESAMPLE:
        raise ValueError(f"interpolation must be one of {', '.join(_RESAMPLE)}, got {interpolation!r}")
    return _RESAMPLE[interpolation]


def _center_crop_or_pad(img: Image.Image, s: int) -> Image.Image:
    """torchvision's CenterCrop / open_clip's CenterCropOrPad (fill 0) to ``s`` x ``s``.

    A side shorter than ``s`` is padded with black, the extra pixel of an odd padding going right / bottom;
    then the center is cropped, its offset rounded as torchvision does.
    """
    w, h = img.size
    if w < s or h < s:
        canvas = Image.new(img.mode, (max(w, s), max(h, s)))
        canvas.paste(img, ((max(w, s) - w) // 2, (max(h, s) - h) // 2))
        img, (w, h) = canvas, canvas.size
    if (w, h) == (s, s):
        return img
    top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
    return img.crop((left, top, left + s, top + s))


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
    """Resize to ``size`` x ``size`` by ``resize_mode``, resampling with ``interpolation``, then normalise.

    ``shortest``: shortest side to ``size`` (torchvision's ``Resize(size)``), center crop. ``longest``:
    longest side to ``size`` keeping the aspect ratio (open_clip's ``ResizeKeepRatio(longest=1)``), pad
    to a centered square with black (``CenterCropOrPad``, fill 0). ``squash``: both sides to ``size``.
    A resize to the image's own size is skipped, as torchvision skips it.
    """

    def __init__(self, size: int, mean, std, resize_mode: str = "shortest", interpolation: str = "bicubic"):
        super().__init__(mean, std)
        if resize_mode not in ("shortest", "longest", "squash"):
            raise ValueError(f"resize_mode must be shortest, longest or squash, got {resize_mode!r}")
        self.size, self.resize_mode, self.interpolation = size, resize_mode, interpolation
        self.resample = _resample(interpolation)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) the image is resized to before the crop or pad."""
        s = self.size
        if self.resize_mode == "squash":
            return s, s
        if self.resize_mode == "longest":
            ratio = max(height / s, width / s)  # ResizeKeepRatio with longest=1: its other terms are exact 0 / 1
            # Python's round, as open_clip; a side that would round to 0 (aspect beyond 2 * size : 1, where
            # open_clip's PIL call raises) keeps 1 pixel
            return max(1, round(width / ratio)), max(1, round(height / ratio))
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = s, int(s * long / short)  # torchvision's rule for Resize(int)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """``rng`` is accepted and unused (deterministic), so both transforms share one signature."""
        size = self.resized_size(*img.size)
        if size != img.size:
            img = img.resize(size, self.resample)
        if self.resize_mode != "squash":
            img = _center_crop_or_pad(img, self.size)
        return super().__call__(img)


def random_crop_params(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
                       rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop rule: (top, left, height, width) of a crop covering ``scale`` of the area
    with aspect ratio (width / height) in ``ratio``, drawn from ``rng``."""
    area = width * height
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_r))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop at the clamped aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class TrainTransform(_ToNormalizedTensor):
    """RandomResizedCrop (area ``scale``, aspect 3/4–4/3, ``interpolation``) -> tensor -> normalise.

    The crop is drawn from an explicit ``random.Random`` when one is passed, so the data pipeline can
    make augmentation a pure function of the sample's position (exact resume) without touching the
    global RNG that dropout uses. The sampling rule is torchvision's. ``resize_mode`` does not apply
    here (open_clip's training transform is a RandomResizedCrop whatever its resize_mode).
    """

    def __init__(self, size: int, mean, std, scale: tuple[float, float] = (0.9, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), interpolation: str = "bicubic"):
        super().__init__(mean, std)
        self.size, self.scale, self.ratio = size, scale, ratio
        self.interpolation, self.resample = interpolation, _resample(interpolation)

    def crop_params(self, width: int, height: int, rng: random.Random) -> tuple[int, int, int, int]:
        return random_crop_params(width, height, self.scale, self.ratio, rng)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        if img.mode != "RGB":
            img = img.convert("RGB")
        return self.apply(img, self.crop_params(img.width, img.height, rng or random))

    def apply(self, img: Image.Image, crop: tuple[int, int, int, int]) -> torch.Tensor:
        """The crop ``(top, left, height, width)`` of an RGB image, resized and normalised."""
        i, j, h, w = crop
        img = img.crop((j, i, j + w, i + h)).resize((self.size, self.size), self.resample)
        return super().__call__(img)


def naflex_size(height: int, width: int, patch: int, seq_len: int, eps: float = 1e-5) -> tuple[int, int]:
    """(height, width) in pixels, multiples of ``patch``, at most ``seq_len`` patches, the aspect ratio kept as
    closely as whole patches allow, at least one patch a side: the largest scale whose sides, rounded up to whole
    patches, fit (a binary search to ``eps``: Hugging Face's ``get_image_size_for_max_num_patches``, the SigLIP 2
    NaFlex processor's rule, so an imported model sees the sizes it was trained with)."""
    if height < 1 or width < 1:
        raise ValueError(f"an image of {width}x{height} pixels has no area")
    if seq_len < 1:
        raise ValueError(f"a sequence of {seq_len} patches holds no image")

    def side(scale: float, size: int) -> int:
        return max(patch, int(math.ceil(size * scale / patch) * patch))

    lo, hi = eps / 10, 100.0
    while hi - lo >= eps:
        mid = (lo + hi) / 2
        if (side(mid, height) / patch) * (side(mid, width) / patch) <= seq_len:
            lo = mid
        else:
            hi = mid
    return side(lo, height), side(lo, width)


class NaFlexImage(tuple):
    """One image as NaFlex patches: ``(patches (rows*cols, patch*patch*3), (rows, cols), seq_len)``; a batch of
    them stacks into :class:`~mm.models.patches.Patches` padded to ``seq_len`` (:func:`stack_images`)."""

    __slots__ = ()

    def __new__(cls, patches: torch.Tensor, grid: tuple[int, int], seq_len: int):
        return super().__new__(cls, (patches, grid, seq_len))


class NaFlexTransform(_ToNormalizedTensor):
    """PIL image -> :class:`NaFlexImage` of at most ``seq_len`` patches, aspect ratio kept (:func:`naflex_size`).

    Evaluation (``train=False``) resizes the whole image. Training first takes a random crop (area ``scale`` of the
    image, aspect ratio the image's own times ``ratio``, drawn from the sample's ``random.Random`` as
    :class:`TrainTransform` draws; ``scale`` (1, 1) keeps the whole image). ``seq_len`` may change between batches
    (the token-budget schedule sets it: :meth:`set_seq_len`)."""

    def __init__(self, patch: int, seq_len: int, mean, std, interpolation: str = "bicubic", train: bool = False,
                 scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        super().__init__(mean, std)
        self.patch, self.train, self.scale, self.ratio = patch, train, scale, ratio
        self.interpolation, self.resample = interpolation, _resample(interpolation)
        self.set_seq_len(seq_len)

    def set_seq_len(self, seq_len: int) -> None:
        if seq_len < 1:
            raise ValueError(f"a sequence of {seq_len} patches holds no image")
        self.seq_len = seq_len

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> NaFlexImage:
        if img.width < 1 or img.height < 1:
            raise ValueError(f"an image of {img.width}x{img.height} pixels has no area")
        if img.mode != "RGB":
            img = img.convert("RGB")
        if self.train:
            own = img.width / img.height
            i, j, h, w = random_crop_params(img.width, img.height, self.scale, (own * self.ratio[0],
                                            own * self.ratio[1]), rng or random)
            img = img.crop((j, i, j + w, i + h))
        h, w = naflex_size(img.height, img.width, self.patch, self.seq_len)
        if (w, h) != img.size:
            img = img.resize((w, h), self.resample)
        patches, grid = patchify(super().__call__(img), self.patch)
        return NaFlexImage(patches, grid, self.seq_len)


def stack_images(images: list) -> torch.Tensor | Patches:
    """A batch of transformed images: square tensors stacked (B, 3, S, S), or :class:`NaFlexImage`s as
    :class:`~mm.models.patches.Patches` padded to their (longest) ``seq_len``."""
    if images and isinstance(images[0], NaFlexImage):
        return Patches.stack([(p, grid) for p, grid, _ in images], length=max(n for _, _, n in images))
    return torch.stack(images)


def image_transform(model_or_cfg: Any, train: bool = False, scale: tuple[float, float] = (0.9, 1.0),
                    seq_len: int | None = None, ratio: tuple[float, float] = (3 / 4, 4 / 3)):
    """PIL image -> normalised (3, S, S) float tensor at the model's ``image_size``; with ``seq_len``, a
    :class:`NaFlexImage` of at most that many patches at the image's own aspect ratio (:class:`NaFlexTransform`).

    Evaluation follows the vision config's ``resize_mode`` and ``interpolation`` (:class:`EvalTransform`).
    ``train=True``: :class:`TrainTransform` (RandomResizedCrop over ``scale`` of the area, open_clip's
    default range, aspect ratio in ``ratio`` (NaFlex: relative to the image's own), resampled with
    ``interpolation``; no flips: captions may say "left" or "right").
    """
    v = _vision_cfg(model_or_cfg)
    if seq_len is not None:
        return NaFlexTransform(v.patch_size, seq_len, v.image_mean, v.image_std, v.interpolation, train, scale, ratio)
    if train:
        return TrainTransform(v.image_size, v.image_mean, v.image_std, scale, ratio, interpolation=v.interpolation)
    return EvalTransform(v.image_size, v.image_mean, v.image_std, resize_mode=v.resize_mode,
                         interpolation=v.interpolation)
