"""The built-in captioned data set: one coloured shape per image on a noisy gradient, procedurally drawn.

Made for the README's main command: tiny-clip (32 px) learns it in minutes on a CPU, and zero-shot
accuracy on the held-out split is a meaningful number. The class is "{colour} {shape}" (6 x 5 = 30
classes); size and position vary and appear only in the captions, which are compositional English from a
dozen templates ("a small red circle on the left"). Zero-shot templates stored in info.json differ from the
caption templates, so evaluation does not just replay training strings.

Layout written by :func:`generate` (one scheme, mirroring ``../shared/datasets/cifar10``)::

    out_dir/train-000000.tar.gz ...   samples: KEY.jpg (JPEG q=95), KEY.txt, KEY.cls, KEY.json
    out_dir/test-000000.tar.gz ...
    out_dir/info.json              {"classes", "templates", "caption_templates", ..., "train": SPLIT, "test": SPLIT}

where SPLIT is the per-split info of :class:`~mm.data.shards.ShardWriter` (``num_samples``, ``shards``,
...). A reader handling both this and a single-split ``info.json`` takes ``info.get(prefix, info)``.
"""
from __future__ import annotations

import io
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from ..utils.io import write_json_atomic
from .shards import ShardWriter

# Six hues 60 degrees apart, saturated; backgrounds are desaturated so colour is always the object's.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35), "yellow": (235, 215, 30), "green": (35, 175, 55),
    "cyan": (30, 200, 215), "blue": (40, 70, 225), "purple": (160, 50, 205),
}
SHAPES = ["circle", "square", "triangle", "star", "cross"]
SIZES = {"small": (0.12, 0.17), "large": (0.25, 0.31)}  # radius as a fraction of the image side
POSITIONS = {"left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1), "center": (0, 0)}
CLASSES = [f"{c} {s}" for c in COLORS for s in SHAPES]

POSITION_PHRASES = {
    "left": ["on the left", "on the left side", "in the left part of the image"],
    "right": ["on the right", "on the right side", "in the right part of the image"],
    "top": ["at the top", "near the top", "in the upper part of the image"],
    "bottom": ["at the bottom", "near the bottom", "in the lower part of the image"],
    "center": ["in the center", "in the middle", "in the center of the image"],
}
SIZE_WORDS = {"small": ["small", "little", "tiny"], "large": ["large", "big"]}
CAPTION_TEMPLATES = [
    "a {size} {color} {shape} {where}",
    "a {size} {color} {shape} {where}.",
    "a {color} {shape}, {size}, {where}",
    "there is a {size} {color} {shape} {where}",
    "{where_cap}, a {size} {color} {shape}",
    "a {size} {shape} colored {color}, {where}",
    "the {shape} {where} is {color} and {size}",
    "one {size} {color} {shape} on a noisy background, {where}",
    "a {color} {shape}",
    "{size} {color} {shape}",
    "a drawing with a {size} {color} {shape} {where}",
    "a {shape} in {color}, {size}, placed {where}",
]
# For zero-shot evaluation: none of these strings is a training caption template.
ZERO_SHOT_TEMPLATES = ["a photo of a {}.", "a {} shape.", "an image showing a {}.", "a picture of a {}.",
                       "a rendering of a {}."]

ATTRIBUTES = ("color", "shape", "size", "position")  # what each sample's json records and a caption may state


def _keywords(phrases: dict[str, list[str]]) -> dict[str, str]:
    """word -> value for the words that occur in the phrases of exactly one value ("upper" -> top; "the" none)."""
    seen: dict[str, set[str]] = {}
    for value, texts in phrases.items():
        for word in re.findall(r"[a-z]+", " ".join(texts).lower()):
            seen.setdefault(word, set()).add(value)
    return {w: next(iter(vs)) for w, vs in seen.items() if len(vs) == 1}


# Each attribute's words, derived from the generator's own tables (so a new phrase is parsed without an edit here)
ATTRIBUTE_WORDS: dict[str, dict[str, str]] = {
    "color": {c: c for c in COLORS},
    "shape": {s: s for s in SHAPES},
    "size": _keywords(SIZE_WORDS),
    "position": _keywords(POSITION_PHRASES),
}


def parse_caption(text: str) -> dict[str, str | None]:
    """The attributes a caption states, by the generator's vocabulary: ``{"color": "blue", "shape": "star",
    "size": "small", "position": "top"}``, None for an attribute it does not state or states two ways ("a red
    circle" has no size or position; "a red or blue circle" no colour). Case, punctuation and the tokenizer's
    spacing ("the center ." ) do not matter; words outside the vocabulary are ignored."""
    words = re.findall(r"[a-z]+", text.lower())
    out: dict[str, str | None] = {}
    for attr, vocab in ATTRIBUTE_WORDS.items():
        found = {vocab[w] for w in words if w in vocab}
        out[attr] = found.pop() if len(found) == 1 else None
    return out


def attribute_accuracy(captions: list[str], truths: list[dict[str, Any]]) -> dict[str, float]:
    """Per attribute, the fraction of ``captions`` that state the true value (``truths``: each image's json
    with ``color`` / ``shape`` / ``size`` / ``position``); a caption that omits an attribute counts as wrong.
    ``all``: the fraction that get all four right."""
    if len(captions) != len(truths) or not captions:
        raise ValueError(f"attribute_accuracy needs as many truths as captions (>0), got {len(captions)} and "
                         f"{len(truths)}")
    parsed = [parse_caption(c) for c in captions]
    acc = {a: sum(p[a] == t.get(a) for p, t in zip(parsed, truths)) / len(captions) for a in ATTRIBUTES}
    acc["all"] = sum(all(p[a] == t.get(a) for a in ATTRIBUTES) for p, t in zip(parsed, truths)) / len(captions)
    return acc


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with outer radius r, rotated by ``rot`` radians."""
    if shape == "square":
        pts = [(math.pi / 4 + k * math.pi / 2, r * 0.95) for k in range(4)]
    elif shape == "triangle":
        pts = [(-math.pi / 2 + k * 2 * math.pi / 3, r * 1.1) for k in range(3)]
    elif shape == "star":
        pts = [(-math.pi / 2 + k * math.pi / 5, r * (1.1 if k % 2 == 0 else 0.45)) for k in range(10)]
    elif shape == "cross":  # a plus sign: 12 corners at arm half-width a, arm length r
        a = 0.33 * r
        xy = [(a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r),
              (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a), (-a, -r)]
        pts = [(math.atan2(y, x), math.hypot(x, y)) for x, y in xy]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + d * math.cos(t + rot), cy + d * math.sin(t + rot)) for t, d in pts]


def draw(color: str, shape: str, size: str, position: str, rng: np.random.Generator,
         image_size: int = 32) -> np.ndarray:
    """One image as a (H, W, 3) uint8 array: the shape is rasterised at 4x and box-filtered down."""
    s, big = image_size, image_size * 4
    r = rng.uniform(*SIZES[size])
    dx, dy = POSITIONS[position]
    reach = 0.5 - r - 0.04  # how far from the centre the shape may go and stay inside the frame
    cx = 0.5 + dx * reach + rng.uniform(-0.04, 0.04)
    cy = 0.5 + dy * reach + rng.uniform(-0.04, 0.04)
    rot = rng.uniform(-0.3, 0.3)  # small tilt: a square must not turn into a diamond
    mask = Image.new("L", (big, big), 0)
    d = ImageDraw.Draw(mask)
    if shape == "circle":
        d.ellipse([(cx - r) * big, (cy - r) * big, (cx + r) * big, (cy + r) * big], fill=255)
    else:
        d.polygon([(x * big, y * big) for x, y in _polygon(shape, cx, cy, r, rot)], fill=255)
    alpha = np.asarray(mask.resize((s, s), Image.Resampling.BOX), dtype=np.float32)[..., None] / 255.0
    # Background: a linear gradient between two muted colours at a random angle.
    c0, c1 = (rng.uniform(60, 200) + rng.uniform(-25, 25, 3) for _ in range(2))
    t = rng.uniform(0, 2 * math.pi)
    ramp = np.cos(t) * np.linspace(-0.5, 0.5, s)[None, :] + np.sin(t) * np.linspace(-0.5, 0.5, s)[:, None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    bg = c0 + (c1 - c0) * ramp[..., None]
    fg = np.asarray(COLORS[color], dtype=np.float32) + rng.uniform(-20, 20, 3)  # colour jitter
    img = bg * (1 - alpha) + fg * alpha + rng.normal(0, 10, (s, s, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def caption(color: str, shape: str, size: str, position: str, rng: np.random.Generator) -> str:
    where = POSITION_PHRASES[position][rng.integers(len(POSITION_PHRASES[position]))]
    words = SIZE_WORDS[size]
    template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
    return template.format(size=words[rng.integers(len(words))], color=color, shape=shape, where=where,
                           where_cap=where[0].upper() + where[1:])


def write_split(out_dir: str | Path, prefix: str, n: int, image_size: int, seed: int, split_id: int,
                samples_per_shard: int, compress: bool) -> dict[str, Any]:
    """Draw ``n`` samples into ``out_dir/PREFIX-*.tar[.gz]``; classes are balanced (each appears n/30 times)."""
    rng = np.random.default_rng([seed, split_id])  # independent streams: train and test never share draws
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    colors, sizes, positions = list(COLORS), list(SIZES), list(POSITIONS)
    with ShardWriter(out_dir, prefix, samples_per_shard, compress, CLASSES, info_name=None, verbose=False) as w:
        for i, label in enumerate(labels):
            color, shape = colors[label // len(SHAPES)], SHAPES[label % len(SHAPES)]
            size, position = sizes[rng.integers(len(sizes))], positions[rng.integers(len(positions))]
            buf = io.BytesIO()
            Image.fromarray(draw(color, shape, size, position, rng, image_size)).save(buf, "JPEG", quality=95)
            meta = {"source": "builtin", "color": color, "shape": shape, "size": size, "position": position,
                    "width": image_size, "height": image_size}
            w.write(f"{i:06d}", buf.getvalue(), "jpg", caption(color, shape, size, position, rng), int(label), meta)
    return w.info


def generate(out_dir: str | Path, n_train: int = 20000, n_test: int = 2000, image_size: int = 32, seed: int = 0,
             samples_per_shard: int = 1000, compress: bool = True, verbose: bool = True) -> dict[str, Any]:
    """Write the train and test splits and ``out_dir/info.json``; returns that info dict.

    Deterministic for a given (seed, sizes): the same call produces byte-identical files. Shards are gzipped
    by default: a 32 px JPEG (~1.2 KB) is smaller than its members' tar headers and padding (6x smaller).
    """
    out = Path(out_dir)
    t0 = time.perf_counter()
    splits = {name: write_split(out, name, n, image_size, seed, split_id, samples_per_shard, compress)
              for split_id, (name, n) in enumerate([("train", n_train), ("test", n_test)])}
    info: dict[str, Any] = {
        "name": "mm-builtin-shapes", "classes": CLASSES, "templates": ZERO_SHOT_TEMPLATES,
        "caption_templates": CAPTION_TEMPLATES, "colors": list(COLORS), "shapes": SHAPES,
        "image_size": image_size, "seed": seed, **splits,
    }
    write_json_atomic(out / "info.json", info)
    if verbose:
        dt = time.perf_counter() - t0
        print(f"wrote {n_train} train + {n_test} test images ({len(CLASSES)} classes) to {out} in {dt:.1f} s")
    return info
