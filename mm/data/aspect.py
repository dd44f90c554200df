"""The built-in mixed-aspect set: one coloured shape per image on canvases of several aspect ratios, for native
aspect ratio (NaFlex) training and evaluation. ``mm shards builtin --aspect`` writes it.

Each sample's canvas has width / height = a, drawn from ``aspects`` (default 1:4, 1:2, 1:1, 2:1, 4:1; balanced:
each occurs n / len(aspects) times, independently of the class), with a long side of ``long_side`` pixels (128 by
default) and a short side of ``round(long_side * min(a, 1 / a))`` (at least 8). On it, on
:mod:`~mm.data.synthetic`'s noisy gradient, one of the 30 ``CLASSES`` ("{colour} {shape}", balanced over the
samples, the sample's label) is drawn with :mod:`~mm.data.synthetic`'s shapes, undistorted (a circle stays round
on a 4:1 canvas) and sized by the SHORT side: nominal radius 0.30-0.40 of it, a slight tilt as in the built-in
set. Its centre is uniform along the long axis (anywhere the whole shape fits, with a margin) and near the middle
of the short axis (jitter of up to 0.04 of the short side). So a square centre crop, what a fixed-resolution
pipeline sees, cuts or misses the object on the elongated canvases. Measured on the default set (``long_side``
128, seed 0, all 22,000 samples) with :func:`center_square_fraction`: the object's box lies less than half inside
the centre square in 69.8 % of the 4:1 and 1:4 samples (49.9 % entirely outside it, only 9.7 % wholly inside) and
in 23.2 % of the 2:1 and 1:2 ones (0.2 % entirely outside); never on 1:1 (the tests check the 4:1 fraction
stays large).

Layout written by :func:`generate_aspect` (as the built-in set's)::

    out_dir/train-000000.tar.gz ...   samples: KEY.jpg (JPEG q=95), KEY.txt, KEY.cls, KEY.json
    out_dir/test-000000.tar.gz ...
    out_dir/info.json              {"classes", "templates", ..., "aspect": true, "aspects", "train", "test"}

``KEY.json``: ``color``, ``shape``, ``size``, ``position`` (the built-in set's attributes, so its caption tooling
keeps working: ``size`` by the object's area relative to the canvas on the built-in set's scale, which makes it
``small`` on 4:1 / 1:4 canvases and ``large`` on the others; ``position`` by the centre, along the long axis),
``aspect`` (the declared width / height, one of ``aspects``; the pixel sizes are ``width`` / ``height``), ``box``
(``[x0, y0, x1, y1]``, the tight box of the shape's 4x-rasterised mask in pixels, quarter-pixel steps, ``x1`` /
``y1`` exclusive) and ``captions`` (4 distinct captions from the built-in caption templates; ``KEY.txt`` is the
first). ``info.json`` has the built-in set's keys (``classes``, zero-shot ``templates``, ``caption_templates``,
``colors``, ``shapes``, ``seed``, per-split ``train`` / ``test``) plus ``"aspect": true``, ``aspects`` and
``long_side``; ``mm zeroshot`` / ``mm eval`` read its classes and templates as the built-in set's.
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from ..utils.io import write_json_atomic
from .scenes import _main_position
from .shards import ShardWriter
from .synthetic import CAPTION_TEMPLATES, CLASSES, COLORS, SHAPES, SIZES, ZERO_SHOT_TEMPLATES, _polygon, caption

ASPECTS = (0.25, 0.5, 1.0, 2.0, 4.0)  # width / height
RADIUS = (0.30, 0.40)                 # nominal radius, as a fraction of the short side
SHORT_JITTER = 0.04                   # the centre's offset from the middle of the short axis, at most (fraction)
EDGE_MARGIN = 0.02                    # free space between the shape's extent and the frame (fraction of short side)
MIN_SHORT_SIDE = 8
# "small" / "large" as the built-in set means them: its radii (fractions of a square side) are 0.12-0.17 / 0.25-0.31;
# here the radius is compared with the side of the square of the canvas's area, sqrt(w * h), at the midpoint.
SIZE_THRESHOLD = (SIZES["small"][1] + SIZES["large"][0]) / 2
N_CAPTIONS = 4


def canvas_size(aspect: float, long_side: int) -> tuple[int, int]:
    """(width, height) of a canvas of ``aspect`` = width / height with a long side of ``long_side`` pixels."""
    short = max(MIN_SHORT_SIDE, int(round(long_side * min(aspect, 1 / aspect))))
    return (long_side, short) if aspect >= 1 else (short, long_side)


def center_square_fraction(box: Sequence[float], width: int, height: int) -> float:
    """The fraction of ``box``'s area (``[x0, y0, x1, y1]``, pixels) inside the canvas's centred square of side
    min(width, height): what of the object a centre crop keeps."""
    s = min(width, height)
    cx0, cy0 = (width - s) / 2, (height - s) / 2
    x0, y0, x1, y1 = box
    inter = max(0.0, min(x1, cx0 + s) - max(x0, cx0)) * max(0.0, min(y1, cy0 + s) - max(y0, cy0))
    area = (x1 - x0) * (y1 - y0)
    return inter / area if area > 0 else 0.0


def _extent(shape: str, r: float, rot: float) -> tuple[float, float, float, float]:
    """(left, right, up, down): how far ``shape`` of radius ``r`` tilted by ``rot`` reaches from its centre."""
    if shape == "circle":
        return r, r, r, r
    pts = _polygon(shape, 0.0, 0.0, r, rot)
    xs, ys = [x for x, _ in pts], [y for _, y in pts]
    return -min(xs), max(xs), -min(ys), max(ys)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """synthetic.draw's background on a w x h canvas: a linear gradient between two muted colours at a random angle
    (in pixel coordinates, so the angle is not skewed by the aspect), as float32 (h, w, 3)."""
    c0, c1 = (rng.uniform(60, 200) + rng.uniform(-25, 25, 3) for _ in range(2))
    t = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(t) * (np.arange(w) - (w - 1) / 2)[None, :] + np.sin(t) * (np.arange(h) - (h - 1) / 2)[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    return (c0 + (c1 - c0) * ramp[..., None]).astype(np.float32)


def _place(shape: str, w: int, h: int, rng: np.random.Generator) -> tuple[float, float, float, float]:
    """(cx, cy, r, rot) in pixels: radius from the short side, centre uniform along the long axis where the shape
    fits and jittered about the middle of the short axis (never out of the frame)."""
    short, wide = min(w, h), w >= h
    r = float(rng.uniform(*RADIUS)) * short
    rot = float(rng.uniform(-0.3, 0.3))  # small tilt: a square must not turn into a diamond
    left, right, up, down = _extent(shape, r, rot)
    m = EDGE_MARGIN * short
    (lo_a, hi_a), (lo_b, hi_b) = ((left, right), (up, down)) if wide else ((up, down), (left, right))
    long_len = max(w, h)
    along = float(rng.uniform(lo_a + m, long_len - hi_a - m))
    j = SHORT_JITTER * short
    across = min(max(short / 2 + float(rng.uniform(-j, j)), lo_b + m), short - hi_b - m)
    return (along, across, r, rot) if wide else (across, along, r, rot)


def draw_aspect(color: str, shape: str, aspect: float, rng: np.random.Generator, long_side: int = 128
                ) -> tuple[np.ndarray, list[float], tuple[float, float], float]:
    """One sample's image as (H, W, 3) uint8 on a canvas of ``aspect`` (:func:`canvas_size`), the shape's box
    (pixels, from its 4x mask), its centre (pixels) and nominal radius (pixels). The shape is rasterised at 4x
    and box-filtered down exactly (a pixel's coverage is its count of covered samples), as the scenes are."""
    w, h = canvas_size(aspect, long_side)
    cx, cy, r, rot = _place(shape, w, h, rng)
    scale = 4
    mask = Image.new("L", (w * scale, h * scale), 0)
    d = ImageDraw.Draw(mask)
    full = scale * scale  # reduce(scale) averages each block: the exact count of covered samples
    if shape == "circle":
        d.ellipse([(cx - r) * scale, (cy - r) * scale, (cx + r) * scale, (cy + r) * scale], fill=full)
    else:
        d.polygon([(x * scale, y * scale) for x, y in _polygon(shape, cx, cy, r, rot)], fill=full)
    bx0, by0, bx1, by1 = mask.getbbox()
    box = [bx0 / scale, by0 / scale, bx1 / scale, by1 / scale]
    alpha = np.asarray(mask.reduce(scale), dtype=np.float32)[..., None] / full
    img = _background(rng, w, h)
    fg = (np.asarray(COLORS[color], dtype=np.float64) + rng.uniform(-20, 20, 3)).astype(np.float32)  # jitter
    img += (fg - img) * alpha  # = img * (1 - alpha) + fg * alpha
    img += rng.normal(0, 10, (h, w, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), box, (cx, cy), r


def _captions(color: str, shape: str, size: str, position: str, rng: np.random.Generator) -> list[str]:
    """``N_CAPTIONS`` distinct captions drawn as the built-in set draws its one (synthetic.caption)."""
    out: list[str] = []
    while len(out) < N_CAPTIONS:
        text = caption(color, shape, size, position, rng)
        if text not in out:
            out.append(text)
    return out


def write_aspect_split(out_dir: str | Path, prefix: str, n: int, long_side: int, seed: int, split_id: int,
                       samples_per_shard: int, compress: bool, aspects: Sequence[float] = ASPECTS) -> dict[str, Any]:
    """Draw ``n`` samples into ``out_dir/PREFIX-*.tar[.gz]``; classes (n/30 each) and aspects are balanced."""
    rng = np.random.default_rng([seed, split_id, 2])  # the 2: not the built-in set's or the scenes' stream
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    aspect_ids = rng.permutation(np.arange(n) % len(aspects))
    colors = list(COLORS)
    with ShardWriter(out_dir, prefix, samples_per_shard, compress, CLASSES, info_name=None, verbose=False) as w:
        for i, (label, a_id) in enumerate(zip(labels, aspect_ids)):
            color, shape, aspect = colors[label // len(SHAPES)], SHAPES[label % len(SHAPES)], float(aspects[a_id])
            image, box, (cx, cy), r = draw_aspect(color, shape, aspect, rng, long_side)
            height, width = image.shape[:2]
            size = "large" if r / math.sqrt(width * height) >= SIZE_THRESHOLD else "small"
            position = _main_position(cx / width, cy / height)
            captions = _captions(color, shape, size, position, rng)
            meta = {"source": "builtin-aspect", "width": width, "height": height, "aspect": aspect,
                    "color": color, "shape": shape, "size": size, "position": position, "box": box,
                    "captions": captions}
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "JPEG", quality=95)
            w.write(f"{i:06d}", buf.getvalue(), "jpg", captions[0], int(label), meta)
    return w.info


def generate_aspect(out_dir: str | Path, n_train: int = 20000, n_test: int = 2000, long_side: int = 128,
                    seed: int = 0, samples_per_shard: int = 1000, compress: bool = True, verbose: bool = True,
                    aspects: Sequence[float] = ASPECTS) -> dict[str, Any]:
    """Write the train and test splits of mixed-aspect images and ``out_dir/info.json``; returns that info dict.

    Deterministic for a given (seed, sizes, aspects): the same call produces byte-identical files."""
    if long_side < 16:
        raise ValueError(f"mixed-aspect images need a long side of at least 16 pixels, got {long_side}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"sample counts must be >= 0, got {n_train} train and {n_test} test")
    aspects = [float(a) for a in aspects]
    if not aspects or not all(math.isfinite(a) and a > 0 for a in aspects):
        raise ValueError(f"aspects must be positive numbers (width / height), got {aspects}")
    out = Path(out_dir)
    t0 = time.perf_counter()
    splits = {name: write_aspect_split(out, name, n, long_side, seed, split_id, samples_per_shard, compress, aspects)
              for split_id, (name, n) in enumerate([("train", n_train), ("test", n_test)])}
    info: dict[str, Any] = {
        "name": "mm-builtin-aspect", "aspect": True, "aspects": aspects, "classes": CLASSES,
        "templates": ZERO_SHOT_TEMPLATES, "caption_templates": CAPTION_TEMPLATES, "colors": list(COLORS),
        "shapes": SHAPES, "long_side": long_side, "seed": seed, **splits,
    }
    write_json_atomic(out / "info.json", info)
    if verbose:
        dt = time.perf_counter() - t0
        print(f"wrote {n_train} train + {n_test} test mixed-aspect images ({len(CLASSES)} classes, aspects "
              f"{', '.join(f'{a:g}' for a in aspects)}) to {out} in {dt:.1f} s")
    return info
