"""Position encodings: fixed 2-D sin-cos tables and rotary embeddings (1-D for text, 2-D for images).

Learned absolute embeddings are plain ``nn.Parameter`` tables owned by the towers.
"""
from __future__ import annotations

import torch
from torch import nn


def sincos_1d(dim: int, pos: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """(N,) positions -> (N, dim) table: [sin(pos * w_i) | cos(pos * w_i)], w_i = base^(-2i/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos dim must be even, got {dim}")
    omega = 1.0 / base ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos.to(torch.float64).reshape(-1, 1) * omega.to(pos.device)[None]
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, grid: int, prefix_tokens: int = 0) -> torch.Tensor:
    """(prefix + grid*grid, dim) fixed table; prefix (class) tokens get zeros.

    Row-major over the patch grid; the first half of the channels encodes the column (x), the second
    half the row (y), which is the MAE / open_clip ``sin_cos_2d`` layout, so weights stay compatible.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos dim must be divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    table = torch.cat([sincos_1d(dim // 2, xs.reshape(-1)), sincos_1d(dim // 2, ys.reshape(-1))], dim=1)
    return torch.cat([torch.zeros(prefix_tokens, dim), table], dim=0)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, T, Dh) queries or keys by tables (T, Dh). Half precision is rotated in fp32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def _rope_angles(dim: int, pos: torch.Tensor, base: float) -> torch.Tensor:
    """(N,) positions -> (N, dim) angles, laid out for rotate_half: the same dim/2 freqs twice."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    ang = pos.float()[:, None] * inv.to(pos.device)[None]
    return torch.cat([ang, ang], dim=-1)


class RotaryEmbedding(nn.Module):
    """1-D RoPE for sequences of up to ``max_len`` tokens; forward(T) -> (cos, sin) of shape (T, head_dim)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        ang = _rope_angles(head_dim, torch.arange(max_len), base)
        # non-persistent: derived from the config, so it never appears in checkpoints
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, length: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[offset : offset + length], self.sin[offset : offset + length]


def axial_rope_angles(head_dim: int, grid: int, *, temperature: float = 10000.0, ref_grid: int | None = None,
                      offset: float = 0.0, column_first: bool = True) -> torch.Tensor:
    """(grid*grid, head_dim) angles of timm's axial RoPE (``RotaryEmbeddingCat``: EVA02, the Perception
    Encoder), in the rotate_half layout mm's attention applies.

    timm gives each head ``head_dim/4`` frequencies ``temperature^(-j / (head_dim/4))`` per axis and rotates
    interleaved channel pairs (2i, 2i+1): pairs [0, head_dim/4) by the first coordinate (the column with
    ``column_first``, timm's ``grid_indexing='xy'``; else the row), the next head_dim/4 by the other. Here pair i
    is (i, i + head_dim/2): the checkpoint converter permutes the query and key channels to match, which
    leaves every attention score unchanged. Coordinates are ``(index + offset) / grid * ref_grid`` (EVA's rule
    for a grid other than the pretraining one), computed in float32 in timm's order of operations so the
    tables are bit-identical to timm's.
    """
    if head_dim % 4:
        raise ValueError(f"axial RoPE needs head_dim divisible by 4, got {head_dim}")
    bands_n = head_dim // 4
    bands = 1.0 / (temperature ** (torch.arange(0, bands_n, 1, dtype=torch.int64).to(torch.float32) / bands_n))
    t = torch.arange(grid, dtype=torch.int64).to(torch.float32) + offset
    if ref_grid is not None:
        t = t / grid * ref_grid
    rows, cols = torch.meshgrid(t, t, indexing="ij")  # (grid, grid): row-major like the patch tokens
    first, second = (cols, rows) if column_first else (rows, cols)
    ang = torch.cat([first.reshape(-1, 1) * bands, second.reshape(-1, 1) * bands], dim=-1)  # (N, head_dim/2)
    return torch.cat([ang, ang], dim=-1)


class RotaryEmbedding2D(nn.Module):
    """2-D RoPE for a (grid x grid) patch sequence. ``prefix_tokens`` (class token) come first and are not
    rotated (cos 1, sin 0). ``axial`` None: mm's own layout (half of each head rotates with the row, half with
    the column, base ``base``); else the keyword arguments of :func:`axial_rope_angles` (timm's Eva towers)."""

    def __init__(self, head_dim: int, grid: int, prefix_tokens: int = 0, base: float = 100.0,
                 axial: dict | None = None):
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim, self.grid, self.prefix_tokens, self.base = head_dim, grid, prefix_tokens, base
        self.axial = dict(axial) if axial is not None else None
        self.init_buffers()

    def _angles(self) -> torch.Tensor:
        if self.axial is not None:
            return axial_rope_angles(self.head_dim, self.grid, **self.axial)
        ys, xs = torch.meshgrid(torch.arange(self.grid), torch.arange(self.grid), indexing="ij")
        return self._angles_at(ys.reshape(-1), xs.reshape(-1))

    def _angles_at(self, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """(N,) rows and columns -> (N, head_dim) angles of mm's own layout."""
        half = self.head_dim // 2
        ay = _rope_angles(half, ys, self.base)  # (N, half)
        ax = _rope_angles(half, xs, self.base)
        # interleave so rotate_half over the full head pairs y-with-y and x-with-x channels
        return torch.cat([ay[:, : half // 2], ax[:, : half // 2], ay[:, half // 2 :], ax[:, half // 2 :]], dim=-1)

    def at(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables (B, 1, prefix + N, head_dim) for patches at ``coords`` (B, N, 2) (row, col) on grids of any shape
        (NaFlex input, mm/models/patches.py): the positions rotate by their own coordinates, as the square table's
        rows do, so a square grid gets the square table. timm's axial tables depend on the grid's size
        (``ref_grid``): such towers run at their fixed size only."""
        if self.axial is not None:
            raise ValueError("axial RoPE (vision.rope) scales positions to one fixed grid: such a tower takes square "
                             "images only, not NaFlex patch sequences")
        b, n, _ = coords.shape
        ang = self._angles_at(coords[..., 0].reshape(-1), coords[..., 1].reshape(-1))
        ang = ang.view(b, n, self.head_dim)
        if self.prefix_tokens:
            ang = torch.cat([ang.new_zeros(b, self.prefix_tokens, self.head_dim), ang], dim=1)
        return ang.cos().unsqueeze(1), ang.sin().unsqueeze(1)

    def init_buffers(self, device: torch.device | str | None = None) -> None:
        """(Re)compute the cos / sin tables: they derive from the config and are never saved, so a model built
        on the meta device and loaded with ``assign=True`` calls this to fill them."""
        ang = torch.cat([torch.zeros(self.prefix_tokens, self.head_dim), self._angles()], dim=0)
        # non-persistent: derived from the config, so it never appears in checkpoints
        self.register_buffer("cos", ang.cos().to(device), persistent=False)
        self.register_buffer("sin", ang.sin().to(device), persistent=False)

    def forward(self, keep: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``keep``: optional (B, T') indices of the tokens still present (patch dropout, prefix
        included); then the tables are (B, 1, T', head_dim) so they broadcast over heads."""
        if keep is None:
            return self.cos, self.sin
        return self.cos[keep].unsqueeze(1), self.sin[keep].unsqueeze(1)
