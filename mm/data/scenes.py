"""The built-in scenes: several shapes per image, each with its box and a referring expression, and a per-pixel
shape map; for LocCa-style training (captioning, referring expression -> box, box -> region caption) and a dense
linear probe. ``mm shards builtin --scenes`` writes it.

Each scene has one large main object (nominal radius r 0.22-0.28 of the side) and 1-2 small distractors (0.10-0.14),
all "{colour} {shape}" pairs distinct within the scene, at random positions inside the frame with centres far
enough apart that they overlap little (main object drawn first, distractors on top), on
:mod:`~mm.data.synthetic`'s noisy gradient. Every shape is scaled to cover the same area for the same r (2 r**2:
a circle's radius is 0.8 r, a star's tips 1.29 r), so any large shape has at least 2.4x the area of any small
one. The main object's class is balanced over the 30 ``CLASSES`` and is the sample's label, so
zero-shot accuracy still means something. Layout written by :func:`generate_scenes` (as the built-in set's)::

    out_dir/train-000000.tar.gz ...   samples: KEY.jpg (JPEG q=95), KEY.txt, KEY.cls, KEY.json, KEY.seg.png
    out_dir/test-000000.tar.gz ...
    out_dir/info.json              {"classes", "templates", ..., "scenes": true, "seg_classes", "train", "test"}

``KEY.json``: the main object's ``color`` / ``shape`` / ``size`` / ``position`` (what the built-in set's json
records, so its attribute tooling keeps working), ``objects`` (``color``, ``shape``, ``size``, ``box``) in drawing
order, ``regions`` (one per object: ``box`` and a referring expression unique in the scene, the format of
:mod:`mm.data.regions`) and ``captions`` (alternative scene captions; ``KEY.txt`` is the first). Boxes are the
tight box of the object's own rasterised mask (at 4x, so quarter-pixel steps), in pixels, ``x1`` / ``y1``
exclusive. ``KEY.seg.png``: 8-bit greyscale, 0 = background, ``1 + SHAPES.index(shape)`` of the top-most object
covering at least half the pixel (``info["seg_classes"]`` names the values).
"""
from __future__ import annotations

import io
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..utils.io import write_json_atomic
from .shards import ShardWriter
from .synthetic import CLASSES, COLORS, POSITION_PHRASES, SHAPES, SIZE_WORDS, ZERO_SHOT_TEMPLATES, _polygon

MAIN_RADIUS = (0.22, 0.28)        # nominal radius r, as a fraction of the image side
DISTRACTOR_RADIUS = (0.10, 0.14)
AREA = 2.0                        # every shape of nominal radius r covers AREA * r**2 (what a size word compares)
EDGE_MARGIN = 0.02                # free space between a shape's extent and the frame
SEPARATION = 1.0                  # centres at least SEPARATION * (rho_a + rho_b) apart, rho = sqrt(AREA / pi) * r
CENTER_ZONE = 0.06                # main object's centre within this of the middle (both axes): position "center"
SEG_CLASSES = ["background", *SHAPES]

# {main}: the main object with a size word ("large red circle"); {others}: the distractors with theirs ("a small
# blue star and a small green cross"); {all}: every object ("a large red circle, a small blue star and a small
# green cross"); {plain_*}: the same without size words; {where}: the main object's position phrase; {n}: the
# number of shapes in words; *_cap: capitalised.
CAPTION_TEMPLATES = [
    "a {main} with {others}",
    "{all}",
    "{others_cap} beside a {main}",
    "a {main} {where}, with {others}",
    "a scene with {all}",
    "{n} shapes: {all}",
    "a drawing of a {main} next to {others}",
    "{n} shapes on a noisy background: {all}",
    "{plain_all_cap}",
    "the biggest shape is a {plain_main}; there is also {others}",
    "{where_cap}, a {main}; near it {others}",
    "a {main} near {others}",
]
# A region's referring expression: every one names colour and shape, which are unique in a scene.
REGION_TEMPLATES = ["the {color} {shape}", "the {size} {color} {shape}"]
NUMBER_WORDS = {2: "two", 3: "three"}


def _shape_geometry(shape: str) -> tuple[float, float]:
    """(scale, reach) of ``shape``: the factor on its radius that makes it cover ``AREA * r**2``, and its outer
    extent (the farthest point from its centre) per nominal radius. synthetic's shapes of equal radius differ in
    area by 2x (a star of radius r is much smaller than a circle), which would blur "large" and "small"."""
    if shape == "circle":
        area, extent = math.pi, 1.0
    else:
        pts = _polygon(shape, 0.0, 0.0, 1.0, 0.0)
        area = 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])))
        extent = max(math.hypot(x, y) for x, y in pts)
    scale = math.sqrt(AREA / area)
    return scale, scale * extent


SHAPE_GEOMETRY = {shape: _shape_geometry(shape) for shape in SHAPES}


def _main_position(cx: float, cy: float) -> str:
    """One of synthetic.POSITIONS' names for a centre (fractions of the side): center near the middle, otherwise
    the side along the axis it is further off."""
    dx, dy = cx - 0.5, cy - 0.5
    if max(abs(dx), abs(dy)) < CENTER_ZONE:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def _layout(rng: np.random.Generator, shapes: list[str]) -> list[tuple[float, float, float]]:
    """(cx, cy, r) of the main object and the distractors (``shapes`` in that order), in fractions of the side, r
    nominal: every shape inside the frame, centres at least SEPARATION * (rho_a + rho_b) apart (redrawn until
    they are)."""
    rho = math.sqrt(AREA / math.pi)  # radius of the circle of the same area, per nominal radius
    while True:
        placed: list[tuple[float, float, float]] = []
        for k, shape in enumerate(shapes):
            r = float(rng.uniform(*(MAIN_RADIUS if k == 0 else DISTRACTOR_RADIUS)))
            lo = SHAPE_GEOMETRY[shape][1] * r + EDGE_MARGIN
            for _ in range(50):
                cx, cy = (float(v) for v in rng.uniform(lo, 1 - lo, 2))
                if all(math.hypot(cx - x, cy - y) >= SEPARATION * rho * (r + q) for x, y, q in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break  # no room for this one: draw the whole layout again
        if len(placed) == len(shapes):
            return placed


def _coverage(shape: str, cx: float, cy: float, r: float, rot: float, s: int, scale: int = 4
              ) -> tuple[tuple[int, int, int, int], np.ndarray, list[float]]:
    """Rasterise ``shape`` (centre and nominal radius in fractions of the side ``s``, drawn at the radius
    ``SHAPE_GEOMETRY`` scales it to) at ``scale`` x inside the window of whole output pixels around it.

    Returns the window ``(x0, y0, x1, y1)`` (output pixels), the coverage of each of its pixels as the number of
    covered samples (uint8, 0..scale**2: an exact box filter) and the tight box of the hi-res mask in output
    pixels (steps of 1 / scale)."""
    scale_r, reach = SHAPE_GEOMETRY[shape]
    ext = reach * r + 1 / s  # one pixel to spare: the rasteriser may touch one more hi-res pixel
    r = scale_r * r
    x0, y0 = max(int(math.floor((cx - ext) * s)), 0), max(int(math.floor((cy - ext) * s)), 0)
    x1, y1 = min(int(math.ceil((cx + ext) * s)), s), min(int(math.ceil((cy + ext) * s)), s)
    big = s * scale
    ox, oy = x0 * scale, y0 * scale
    # fill=scale**2: reduce(scale) averages each scale x scale block, which is then the exact count of covered samples
    mask = Image.new("L", ((x1 - x0) * scale, (y1 - y0) * scale), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([(cx - r) * big - ox, (cy - r) * big - oy, (cx + r) * big - ox, (cy + r) * big - oy],
                  fill=scale * scale)
    else:
        d.polygon([(x * big - ox, y * big - oy) for x, y in _polygon(shape, cx, cy, r, rot)], fill=scale * scale)
    bx0, by0, bx1, by1 = mask.getbbox()
    box = [(bx0 + ox) / scale, (by0 + oy) / scale, (bx1 + ox) / scale, (by1 + oy) / scale]
    return (x0, y0, x1, y1), np.asarray(mask.reduce(scale)), box


def draw_scene(objects: list[tuple[str, str]], rng: np.random.Generator, image_size: int = 64
               ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Draw ``objects`` ((colour, shape) pairs, the main one first) into one scene.

    Returns the (H, W, 3) uint8 image, the (H, W) uint8 shape map (0 background, 1 + SHAPES.index) and per object
    ``{"color", "shape", "size", "box", "center"}`` (box in pixels, from the 4x mask; center in fractions).
    Shapes are rasterised at 4x and box-filtered down, as :func:`mm.data.synthetic.draw` does; a shape map pixel
    is the top-most shape covering at least half of it."""
    s, scale = image_size, 4
    layout = _layout(rng, [shape for _, shape in objects])
    # Background: a linear gradient between two muted colours at a random angle (synthetic.draw's).
    c0, c1 = (rng.uniform(60, 200) + rng.uniform(-25, 25, 3) for _ in range(2))
    t = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(t) * np.linspace(-0.5, 0.5, s)[None, :] + np.sin(t) * np.linspace(-0.5, 0.5, s)[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    img = (c0 + (c1 - c0) * ramp[..., None]).astype(np.float32)
    seg = np.zeros((s, s), np.uint8)
    out = []
    for k, ((color, shape), (cx, cy, r)) in enumerate(zip(objects, layout)):
        rot = rng.uniform(-0.3, 0.3)  # small tilt: a square must not turn into a diamond
        (x0, y0, x1, y1), count, box = _coverage(shape, cx, cy, r, rot, s, scale)
        alpha = count.astype(np.float32)[..., None] / (scale * scale)
        fg = (np.asarray(COLORS[color], dtype=np.float64) + rng.uniform(-20, 20, 3)).astype(np.float32)  # jitter
        win = img[y0:y1, x0:x1]
        win += (fg - win) * alpha  # = win * (1 - alpha) + fg * alpha
        seg[y0:y1, x0:x1][count * 2 >= scale * scale] = 1 + SHAPES.index(shape)
        out.append({"color": color, "shape": shape, "size": "large" if k == 0 else "small", "box": box,
                    "center": (cx, cy)})
    img += rng.normal(0, 10, (s, s, 3)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), seg, out


def _phrase(obj: dict[str, Any], rng: np.random.Generator, sized: bool = True) -> str:
    words = SIZE_WORDS[obj["size"]]
    return f"{words[rng.integers(len(words))]} {obj['color']} {obj['shape']}" if sized \
        else f"{obj['color']} {obj['shape']}"


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def scene_captions(objects: list[dict[str, Any]], position: str, rng: np.random.Generator, n: int = 4) -> list[str]:
    """``n`` scene captions from distinct templates, each naming every object (the main one first in ``objects``;
    the distractors in a random order per caption)."""
    captions = []
    for ti in rng.choice(len(CAPTION_TEMPLATES), size=n, replace=False):
        others = [objects[1 + i] for i in rng.permutation(len(objects) - 1)]
        main, plain_main = _phrase(objects[0], rng), _phrase(objects[0], rng, sized=False)
        sized = [f"a {_phrase(o, rng)}" for o in others]
        plain = [f"a {_phrase(o, rng, sized=False)}" for o in others]
        where = POSITION_PHRASES[position][rng.integers(len(POSITION_PHRASES[position]))]
        fields = {"main": main, "plain_main": plain_main, "others": _join(sized), "all": _join([f"a {main}", *sized]),
                  "plain_all": _join([f"a {plain_main}", *plain]), "where": where, "n": NUMBER_WORDS[len(objects)]}
        fields.update({f"{k}_cap": v[0].upper() + v[1:] for k, v in list(fields.items())})
        captions.append(CAPTION_TEMPLATES[ti].format(**fields))
    return captions


def region_caption(obj: dict[str, Any], rng: np.random.Generator) -> str:
    """A referring expression for ``obj``, unique in its scene (colour and shape pairs are)."""
    words = SIZE_WORDS[obj["size"]]
    template = REGION_TEMPLATES[rng.integers(len(REGION_TEMPLATES))]
    return template.format(size=words[rng.integers(len(words))], color=obj["color"], shape=obj["shape"])


def _png(seg: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(seg).save(buf, "PNG")  # a 2-d uint8 array: mode L
    return buf.getvalue()


def write_scene_split(out_dir: str | Path, prefix: str, n: int, image_size: int, seed: int, split_id: int,
                      samples_per_shard: int, compress: bool) -> dict[str, Any]:
    """Draw ``n`` scenes into ``out_dir/PREFIX-*.tar[.gz]``; main-object classes are balanced (n/30 each)."""
    rng = np.random.default_rng([seed, split_id, 1])  # the 1: not the built-in set's stream of the same seed
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    colors = list(COLORS)
    with ShardWriter(out_dir, prefix, samples_per_shard, compress, CLASSES, info_name=None, verbose=False) as w:
        for i, label in enumerate(labels):
            n_objects = 2 + int(rng.integers(2))
            others = [int(c) for c in rng.choice([c for c in range(len(CLASSES)) if c != label], n_objects - 1,
                                                 replace=False)]
            pairs = [(colors[c // len(SHAPES)], SHAPES[c % len(SHAPES)]) for c in [int(label), *others]]
            image, seg, objects = draw_scene(pairs, rng, image_size)
            position = _main_position(*objects[0]["center"])
            captions = scene_captions(objects, position, rng)
            main = objects[0]
            meta = {
                "source": "builtin-scenes", "width": image_size, "height": image_size, "color": main["color"],
                "shape": main["shape"], "size": main["size"], "position": position,
                "objects": [{k: o[k] for k in ("color", "shape", "size", "box")} for o in objects],
                "regions": [{"box": o["box"], "caption": region_caption(o, rng)} for o in objects],
                "captions": captions,
            }
            buf = io.BytesIO()
            Image.fromarray(image).save(buf, "JPEG", quality=95)
            w.write(f"{i:06d}", buf.getvalue(), "jpg", captions[0], int(label), meta,
                    extra_members={"seg.png": _png(seg)})
    return w.info


def generate_scenes(out_dir: str | Path, n_train: int = 20000, n_test: int = 2000, image_size: int = 64,
                    seed: int = 0, samples_per_shard: int = 1000, compress: bool = True,
                    verbose: bool = True) -> dict[str, Any]:
    """Write the train and test splits of scenes and ``out_dir/info.json``; returns that info dict.

    Deterministic for a given (seed, sizes): the same call produces byte-identical files."""
    if image_size < 16:
        raise ValueError(f"scenes need an image size of at least 16 pixels, got {image_size}")
    if n_train < 0 or n_test < 0:
        raise ValueError(f"sample counts must be >= 0, got {n_train} train and {n_test} test")
    out = Path(out_dir)
    t0 = time.perf_counter()
    splits = {name: write_scene_split(out, name, n, image_size, seed, split_id, samples_per_shard, compress)
              for split_id, (name, n) in enumerate([("train", n_train), ("test", n_test)])}
    info: dict[str, Any] = {
        "name": "mm-builtin-scenes", "scenes": True, "classes": CLASSES, "templates": ZERO_SHOT_TEMPLATES,
        "caption_templates": CAPTION_TEMPLATES, "region_templates": REGION_TEMPLATES, "colors": list(COLORS),
        "shapes": SHAPES, "seg_classes": SEG_CLASSES, "image_size": image_size, "seed": seed, **splits,
    }
    write_json_atomic(out / "info.json", info)
    if verbose:
        dt = time.perf_counter() - t0
        print(f"wrote {n_train} train + {n_test} test scenes ({len(CLASSES)} main-object classes) to {out} "
              f"in {dt:.1f} s")
    return info
