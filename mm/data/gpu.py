"""Training images decoded and augmented on the GPU (``data.decode: gpu``).

PIL decodes about 160 JPEGs per second per CPU core with RandomResizedCrop (measured on the H200
machine's cores), so a 16-core machine cannot feed a ViT-B/32 step. On this path the DataLoader
workers do not decode: for a JPEG they read only the header, draw the crop box from the sample's own
RNG (the same rule as :class:`~mm.data.transforms.TrainTransform`, so exact resume still holds) and pass
the compressed bytes on. The main process decodes the whole batch with ``torchvision.io.decode_jpeg``
on the device (nvJPEG on CUDA), crops, resizes (the worker transform's ``interpolation``: bicubic or
bilinear, antialiased, as PIL's) and normalises there.

Images the GPU decoder should not see (PNG, WebP, CMYK or 16-bit JPEGs, EXIF-rotated photos) are decoded
in the worker by the CPU transform as before and travel as finished tensors; a batch may mix both.
"""
from __future__ import annotations

import io
import random
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import BadSample, decode_image
from .transforms import TrainTransform

_EXIF_ORIENTATION = 0x0112


@dataclass
class DeferredImage:
    """A JPEG still compressed, with its crop box (top, left, height, width) already drawn."""

    data: torch.Tensor  # uint8 bytes of the file
    box: tuple[int, int, int, int]
    interpolation: str = "bicubic"  # the worker transform's resampling (TrainTransform.interpolation)


class DeferredTrainTransform:
    """Worker side: raw image bytes -> :class:`DeferredImage` (RGB/gray JPEGs) or a finished tensor."""

    def __init__(self, cpu: TrainTransform, max_pixels: int):
        self.cpu = cpu
        self.max_pixels = max_pixels

    def __call__(self, data: bytes, rng: random.Random | None = None) -> DeferredImage | torch.Tensor:
        rng = rng or random.Random()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                head = Image.open(io.BytesIO(data))  # lazy: reads the header only
                fmt, mode, (w, h) = head.format, head.mode, head.size
                if w * h > self.max_pixels:
                    raise BadSample("too many pixels", f"{w}x{h} > {self.max_pixels}")
                if fmt != "JPEG" or mode not in ("RGB", "L") or head.getexif().get(_EXIF_ORIENTATION, 1) != 1:
                    return self.cpu(decode_image(data, self.max_pixels), rng)
                # A corrupt body must be found here, where the sample can still be skipped (the batch
                # size is fixed once collated). JPEG decodes at 1/8 scale in the DCT domain: a small
                # fraction of a full decode, and it reads every entropy-coded block.
                head.draft("RGB", (max(1, w // 8), max(1, h // 8)))
                head.load()
        except BadSample:
            raise
        except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
            raise BadSample("undecodable image", f"{type(e).__name__}: {e}") from None
        return DeferredImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), self.cpu.crop_params(w, h, rng),
                             self.cpu.interpolation)


@dataclass
class PendingImages:
    """A collated batch on the GPU path: deferred JPEGs and CPU-finished tensors, with their positions."""

    jpegs: list[DeferredImage]
    jpeg_pos: list[int]
    ready: torch.Tensor | None  # (m, 3, S, S) normalised float
    ready_pos: list[int]

    @property
    def n(self) -> int:
        return len(self.jpeg_pos) + len(self.ready_pos)

    @staticmethod
    def collate(images: list[DeferredImage | torch.Tensor]) -> "PendingImages":
        jpeg_pos = [i for i, x in enumerate(images) if isinstance(x, DeferredImage)]
        ready_pos = [i for i, x in enumerate(images) if not isinstance(x, DeferredImage)]
        ready = torch.stack([images[i] for i in ready_pos]) if ready_pos else None
        return PendingImages([images[i] for i in jpeg_pos], jpeg_pos, ready, ready_pos)


def _decode_jpeg(data, device: torch.device):
    """torchvision's decode_jpeg (a tensor or a list, batched on CUDA) to RGB on ``device``."""
    # torchvision 0.29 marks its image codecs deprecated in favour of TorchCodec, which is not a
    # dependency here; its batched nvJPEG decode is what this path needs, and it works.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


# PIL's antialiased filters (the worker path) -> torch's interpolate modes with antialias=True, their match
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear"}


class GpuImageDecoder:
    """Main-process side: :class:`PendingImages` -> normalised (B, 3, S, S) float images on ``device``.

    Each JPEG is resized with the interpolation its worker transform was configured with (carried by the
    :class:`DeferredImage`), so the decoder needs no setting of its own.
    """

    def __init__(self, size: int, mean, std):
        self.size = size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255

    def _decode(self, jpegs: list[DeferredImage], device: torch.device) -> list[torch.Tensor]:
        data = [j.data for j in jpegs]
        try:
            return _decode_jpeg(data, device)
        except RuntimeError:  # a file the device decoder does not support fails the batch call
            return [self._decode_one(d, device) for d in data]

    @staticmethod
    def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor:
        try:
            return _decode_jpeg(data, device)
        except RuntimeError:  # the worker read it with PIL, so PIL can decode it
            img = decode_image(data.numpy().tobytes(), max_pixels=2**62)
            return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).to(device)

    def __call__(self, pending: PendingImages, device: torch.device | str) -> torch.Tensor:
        device = torch.device(device)
        s = self.size
        out = torch.empty(pending.n, 3, s, s, device=device)
        mean, std = self.mean.to(device), self.std.to(device)
        decoded = self._decode(pending.jpegs, device) if pending.jpegs else []
        for pos, img, jpeg in zip(pending.jpeg_pos, decoded, pending.jpegs):
            i, j, h, w = jpeg.box
            crop = img[:, i:i + h, j:j + w].unsqueeze(0).float()
            # bicubic / bilinear with antialiasing is torch's match for PIL's BICUBIC / BILINEAR (the CPU path)
            x = F.interpolate(crop, size=(s, s), mode=_MODES[jpeg.interpolation], antialias=True,
                              align_corners=False)
            out[pos] = ((x.clamp_(0, 255) - mean) / std)[0]
        if pending.ready is not None:
            out[pending.ready_pos] = pending.ready.to(device, non_blocking=True)
        return out
