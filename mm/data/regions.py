"""Regions of an image: boxes with their captions, as a sample's ``json`` member carries them, and the quantised
coordinate tokens a LocCa decoder reads and writes (:mod:`mm.data.locca`).

The format (webdataset shards; ``mm shards builtin --scenes`` writes it)::

    KEY.json = {..., "regions": [{"box": [x0, y0, x1, y1], "caption": "the red circle"}, ...]}

``box`` is in pixels of the stored image, ``x0 <= x1`` and ``y0 <= y1``, inside ``[0, width] x [0, height]``
(``x1`` / ``y1`` are the right / bottom edges: a box covering the whole image is ``[0, 0, width, height]``);
``caption`` is the region's referring expression (what tells it apart in the image) and its caption. Other keys of
a region are kept and ignored. A region that breaks a rule is reported by name (``region 2: x1 < x0 (...)``) and
left out; the rest of the sample trains as usual.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in pixels

# a box may reach past the image edge by this much (pixels) before it counts as outside: rounding of coordinates
EDGE_TOLERANCE = 0.5


@dataclass(frozen=True)
class Region:
    box: Box
    caption: str


def parse_regions(info: dict[str, Any], width: int, height: int) -> tuple[list[Region], list[str]]:
    """The valid regions of a sample's json (``info``), boxes clipped to the image, and one problem line for each
    region left out: not an object, no / malformed box, ``x1 < x0`` or ``y1 < y0``, empty box, outside the
    ``width`` x ``height`` image, empty or missing caption. A json without ``regions`` has none (no problem); a
    ``regions`` that is not a list is one problem."""
    raw = info.get("regions")
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        return [], [f"regions: a {type(raw).__name__}, not a list"]
    good, problems = [], []
    for i, r in enumerate(raw):
        region, problem = _region(r, width, height)
        if problem is not None:
            problems.append(f"region {i}: {problem}")
        else:
            good.append(region)
    return good, problems


def _region(r: Any, width: int, height: int) -> tuple[Region | None, str | None]:
    if not isinstance(r, dict):
        return None, f"a {type(r).__name__}, not an object"
    box = r.get("box")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return None, f"box must be 4 numbers [x0, y0, x1, y1], got {box!r}"
    x0, y0, x1, y1 = (float(v) for v in box)
    if x1 < x0 or y1 < y0:
        return None, f"{'x1 < x0' if x1 < x0 else 'y1 < y0'} in box {list(box)}"
    if x1 == x0 or y1 == y0:
        return None, f"empty box {list(box)}"
    tol = EDGE_TOLERANCE
    if x0 < -tol or y0 < -tol or x1 > width + tol or y1 > height + tol:
        return None, f"box {list(box)} outside the {width}x{height} image"
    caption = r.get("caption")
    if not isinstance(caption, str) or not caption.strip():
        return None, f"empty caption (box {list(box)})" if isinstance(caption, str) or caption is None \
            else f"caption must be a string, got {type(caption).__name__}"
    box = (max(x0, 0.0), max(y0, 0.0), min(x1, float(width)), min(y1, float(height)))
    return Region(box, caption.strip()), None


def crop_box(box: Box, crop: tuple[int, int, int, int], out_w: int, out_h: int,
             min_visible: float = 0.5) -> Box | None:
    """``box`` (pixels of the source image) in the pixels of a crop resized to ``out_w`` x ``out_h``; ``crop`` is
    ``(top, left, height, width)`` as :meth:`~mm.data.transforms.TrainTransform.crop_params` draws it. The box is
    clipped to the crop; None when less than ``min_visible`` of its area stays inside (the region is not what the
    crop shows any more)."""
    top, left, h, w = crop
    x0, y0, x1, y1 = box
    cx0, cy0, cx1, cy1 = max(x0, left), max(y0, top), min(x1, left + w), min(y1, top + h)
    if cx1 <= cx0 or cy1 <= cy0:
        return None
    area = (x1 - x0) * (y1 - y0)
    if (cx1 - cx0) * (cy1 - cy0) < min_visible * area:
        return None
    sx, sy = out_w / w, out_h / h
    return ((cx0 - left) * sx, (cy0 - top) * sy, (cx1 - left) * sx, (cy1 - top) * sy)


def quantize(box: Box, width: float, height: float, bins: int) -> tuple[int, int, int, int]:
    """Each coordinate as its bin of ``bins`` equal bins over the image side: ``min(floor(x / width * bins),
    bins - 1)`` (LocCa / Pix2Seq's quantisation); the inverse is :func:`dequantize` (bin centres)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    sides = (width, height, width, height)
    return tuple(min(max(int(v / s * bins), 0), bins - 1) for v, s in zip(box, sides))  # type: ignore[return-value]


def dequantize(bins4: Sequence[int], width: float, height: float, bins: int) -> Box:
    """The box whose coordinates are the centres of ``bins4``'s bins: within half a bin (``side / (2 * bins)``) of
    any box that quantises to them."""
    sides = (width, height, width, height)
    return tuple((int(b) + 0.5) / bins * s for b, s in zip(bins4, sides))  # type: ignore[return-value]


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two boxes (0 when either is empty)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
