"""NaFlex input: images at their own aspect ratio and size, as padded sequences of patches (Dehghani et al. 2023's
NaViT and SigLIP 2's NaFlex, as timm's ``NaFlexVit`` and Hugging Face's ``Siglip2VisionModel`` take them).

A batch is a :class:`Patches`: every image cut into ``patch x patch`` squares on its own (rows, cols) grid, the
patches of each image flattened row-major and laid out channels-last inside a patch (``(row, col, channel)``: the
layout of timm's ``batch_patchify`` and Hugging Face's ``convert_image_to_patches``), padded to the batch's
sequence length. An image tower (mm/models/vision.py) runs it through the same weights as a square image: the patch
embedding's convolution as a linear map, the position table resized to each image's grid, attention and pooling
masked to each image's own patches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Patches:
    """A padded batch of patch sequences.

    ``pixels`` (B, N, patch*patch*3) normalised pixels; ``coords`` (B, N, 2) each patch's (row, col) on its image's
    grid (padding: (0, 0)); ``valid`` (B, N) bool, True for an image's own patches (they come first); ``shapes``
    (B, 2) each image's grid (rows, cols), kept on the host (resizing position tables reads them without a device
    sync); ``padded``: whether any position is padding (host-side, so an unpadded batch skips attention masks).
    """

    pixels: torch.Tensor
    coords: torch.Tensor
    valid: torch.Tensor
    shapes: torch.Tensor
    padded: bool

    @property
    def shape(self) -> torch.Size:
        return self.pixels.shape

    @property
    def device(self) -> torch.device:
        return self.pixels.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pixels.dtype

    def __len__(self) -> int:
        return self.pixels.shape[0]

    def size(self, dim: int | None = None):
        return self.pixels.shape if dim is None else self.pixels.shape[dim]

    def to(self, *args, **kwargs) -> Patches:
        """Pixels (dtype and device), coordinates and mask (device only) moved; the grid shapes stay on the host."""
        pixels = self.pixels.to(*args, **kwargs)
        dev = {k: v for k, v in kwargs.items() if k == "non_blocking"}
        return Patches(pixels, self.coords.to(pixels.device, **dev), self.valid.to(pixels.device, **dev),
                       self.shapes, self.padded)

    def pin_memory(self) -> Patches:
        """Page-locked pixels, coordinates and mask (a DataLoader with ``pin_memory`` calls this)."""
        return Patches(self.pixels.pin_memory(), self.coords.pin_memory(), self.valid.pin_memory(), self.shapes,
                       self.padded)

    def __getitem__(self, index) -> Patches:
        """Rows of the batch (a slice or index tensor), trimmed to their longest sequence."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        host = index.cpu() if isinstance(index, torch.Tensor) else index
        shapes = self.shapes[host]
        lengths = shapes.prod(1)
        n = int(lengths.max()) if len(lengths) else 0
        return Patches(self.pixels[index, :n], self.coords[index, :n], self.valid[index, :n], shapes,
                       bool((lengths < n).any()))

    def lengths(self) -> torch.Tensor:
        """(B,) patches per image (host)."""
        return self.shapes.prod(1)

    def padding_fraction(self) -> float:
        """The share of positions that are padding."""
        return 1.0 - float(self.lengths().sum()) / max(1, self.pixels.shape[0] * self.pixels.shape[1])

    @staticmethod
    def stack(items: list[tuple[torch.Tensor, tuple[int, int]]], length: int | None = None) -> Patches:
        """(patches (n_i, D), (rows, cols)) per image -> a batch padded to ``length`` (default: the longest)."""
        if not items:
            raise ValueError("no images to stack")
        n = max(p.shape[0] for p, _ in items) if length is None else length
        b, d = len(items), items[0][0].shape[1]
        pixels = items[0][0].new_zeros(b, n, d)
        coords = torch.zeros(b, n, 2, dtype=torch.long)
        valid = torch.zeros(b, n, dtype=torch.bool)
        for i, (p, (rows, cols)) in enumerate(items):
            k = p.shape[0]
            if k != rows * cols or k > n:
                raise ValueError(f"image {i}: {k} patches for a {rows}x{cols} grid in sequences of {n}")
            pixels[i, :k] = p
            coords[i, :k] = grid_coords(rows, cols)
            valid[i, :k] = True
        shapes = torch.tensor([s for _, s in items], dtype=torch.long)
        return Patches(pixels, coords, valid, shapes, bool((shapes.prod(1) < n).any()))


def grid_coords(rows: int, cols: int) -> torch.Tensor:
    """(rows*cols, 2) (row, col) of each patch, row-major."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([r.reshape(-1), c.reshape(-1)], dim=1)


def patchify(image: torch.Tensor, patch: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(3, H, W) with H and W multiples of ``patch`` -> ((H/p)*(W/p), p*p*3) row-major patches, channels last
    inside each patch, and the grid (rows, cols)."""
    c, h, w = image.shape
    if h % patch or w % patch:
        raise ValueError(f"a {h}x{w} image is not a whole number of {patch}-pixel patches")
    rows, cols = h // patch, w // patch
    x = image.reshape(c, rows, patch, cols, patch).permute(1, 3, 2, 4, 0)  # (rows, cols, p, p, C)
    return x.reshape(rows * cols, patch * patch * c), (rows, cols)


def square_patches(images: torch.Tensor, patch: int) -> Patches:
    """A batch of square (B, 3, S, S) images as :class:`Patches` (no padding): what the square path computes, in
    the NaFlex form."""
    return Patches.stack([patchify(im, patch) for im in images])
