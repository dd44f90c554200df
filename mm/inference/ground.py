"""Using a LocCa decoder (:mod:`mm.data.locca`): referring (an expression -> the box it names) and region captions
(a box -> what is in it).

Referring: the decoder continues ``sot locate: expression`` with four box tokens ``x0 y0 x1 y1``, decoded greedily
with every other id masked (four steps, the KV cache as :mod:`mm.inference.generate` uses it). Prompts of a batch
that differ in length are decoded in groups of one length each: the cached decoder has no padding mask, and a
group needs none. A box's ``score`` is the mean log-probability of its four tokens under that masked distribution
(the softmax over the box tokens alone). Region captions: ``sot describe: x0 y0 x1 y1`` continued by
:func:`~mm.inference.generate.generate` (which never writes box tokens into a caption).

Boxes are ``(x0, y0, x1, y1)`` in pixels of the image as given (a PIL image or a file); the model reads and writes
them in pixels of its input, the ``size`` x ``size`` square its eval preprocessing makes (:class:`Placement`).
For an already preprocessed tensor the boxes are in its pixels unless the images' original ``sizes`` are given.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.folder import load_image
from ..data.locca import DecoderPrompts, LocTokens
from ..data.regions import EDGE_TOLERANCE, Box
from ..data.transforms import EvalTransform, image_transform
from ..utils.nn import eval_mode
from .generate import GenerationConfig, generate

BOX_TOKENS = 4  # x0 y0 x1 y1


class GroundingError(ValueError):
    """A model that cannot read or write boxes, or a box or expression it cannot use: the caller's to fix."""


# ----------------------------------------------------------------------------------------------------
# Geometry: original-image pixels <-> model-input pixels
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Placement:
    """Where the eval preprocessing puts a ``width`` x ``height`` image in the ``in_width`` x ``in_height`` model
    input: ``input = image * scale + offset`` per axis. ``shortest`` resizes the shortest side to the input size and
    crops the centre (negative offset: the parts outside are cut off), ``longest`` resizes the longest side and pads
    (positive offset: the input around the image is black), ``squash`` stretches both sides. The resize maps the
    image's extent ``[0, width]`` onto the resized one exactly, so the map is affine and its inverse exact."""

    width: int
    height: int
    in_width: int
    in_height: int
    scale_x: float = 1.0
    scale_y: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0

    @classmethod
    def of(cls, model_or_transform: Any, width: int, height: int) -> Placement:
        """The placement :class:`~mm.data.transforms.EvalTransform` (the model's, or the one given) makes."""
        t = model_or_transform if isinstance(model_or_transform, EvalTransform) \
            else image_transform(model_or_transform, train=False)
        s = t.size
        rw, rh = t.resized_size(width, height)  # (a resize to the image's own size, skipped, is scale 1 alike)
        offset_x = offset_y = 0
        if t.resize_mode != "squash":  # _center_crop_or_pad: pad a short side (extra pixel right / bottom), crop
            cw, ch = max(rw, s), max(rh, s)
            offset_x, offset_y = (cw - rw) // 2, (ch - rh) // 2
            if (cw, ch) != (s, s):
                offset_x -= int(round((cw - s) / 2.0))
                offset_y -= int(round((ch - s) / 2.0))
        return cls(width, height, s, s, rw / width, rh / height, float(offset_x), float(offset_y))

    @classmethod
    def identity(cls, width: int, height: int) -> Placement:
        """Boxes already in input pixels (a preprocessed tensor without the original sizes)."""
        return cls(width, height, width, height)

    def to_input(self, box: Box) -> Box:
        """``box`` (image pixels) in input pixels, clipped to the input (a part cropped off is lost)."""
        x0, y0, x1, y1 = box
        sx, sy, ox, oy = self.scale_x, self.scale_y, self.offset_x, self.offset_y
        return _clip((x0 * sx + ox, y0 * sy + oy, x1 * sx + ox, y1 * sy + oy), self.in_width, self.in_height)

    def to_image(self, box: Box) -> Box:
        """``box`` (input pixels) in image pixels, clipped to the image (a part in the padding is lost)."""
        x0, y0, x1, y1 = box
        sx, sy, ox, oy = self.scale_x, self.scale_y, self.offset_x, self.offset_y
        return _clip(((x0 - ox) / sx, (y0 - oy) / sy, (x1 - ox) / sx, (y1 - oy) / sy), self.width, self.height)


def _clip(box: Box, width: float, height: float) -> Box:
    x0, y0, x1, y1 = box
    cx = lambda v: min(max(v, 0.0), float(width))  # noqa: E731
    cy = lambda v: min(max(v, 0.0), float(height))  # noqa: E731
    return (cx(x0), cy(y0), cx(x1), cy(y1))


def box_to_input(model_or_transform: Any, box: Box, width: int, height: int) -> Box:
    """``box`` in pixels of a ``width`` x ``height`` image -> pixels of the model's input (see :class:`Placement`)."""
    return Placement.of(model_or_transform, width, height).to_input(box)


def box_to_image(model_or_transform: Any, box: Box, width: int, height: int) -> Box:
    """``box`` in pixels of the model's input -> pixels of the ``width`` x ``height`` image it was made from."""
    return Placement.of(model_or_transform, width, height).to_image(box)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------

def box_tokens(model: Any) -> LocTokens:
    """The model's box tokens; GroundingError naming ``decoder.loc_bins`` when it has none (or no decoder)."""
    try:
        loc = LocTokens.of(getattr(model, "config", None))
    except (ValueError, AttributeError):
        raise GroundingError("decoder.loc_bins: the model has no box tokens (a LocCa model is needed: a decoder "
                             "with loc_bins > 0, e.g. the tiny-siglip2 preset)") from None
    if not hasattr(model, "next_token_logits"):
        raise GroundingError(f"{type(model).__name__} has no captioning decoder to read or write boxes")
    return loc


def _batches(model: Any, images: torch.Tensor | Sequence[Any], sizes: Sequence[tuple[int, int]] | None,
             batch_size: int, device: torch.device):
    """(start, (B, 3, S, S) input on ``device``, [Placement]) per batch of ``images``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    tensor = isinstance(images, torch.Tensor)
    if sizes is not None and len(sizes) != len(images):
        raise ValueError(f"{len(sizes)} sizes for {len(images)} images")
    transform = None if tensor else image_transform(model, train=False)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        if tensor:
            h, w = chunk.shape[-2:]
            places = [Placement.of(model, *sizes[start + i]) if sizes is not None else Placement.identity(w, h)
                      for i in range(len(chunk))]
            yield start, chunk.to(device), places
            continue
        pil = [load_image(im) if isinstance(im, (str, Path)) else im for im in chunk]
        places = [Placement.of(transform, *im.size) for im in pil]
        yield start, torch.stack([transform(im) for im in pil]).to(device), places


def _device(model: Any, device: torch.device | str | None) -> torch.device:
    return torch.device(device) if device is not None else next(model.parameters()).device


# ----------------------------------------------------------------------------------------------------
# Referring: expression -> box
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Located:
    """A grounded expression: its ``box`` (pixels of the image; x0 <= x1, y0 <= y1), ``score`` (mean log-probability
    of the four box tokens, among the box tokens: 0 is certain, ``-log(bins)`` a uniform guess) and the four token
    ids the decoder wrote (x0 y0 x1 y1, as written: a pair written in reverse order is sorted in ``box`` only)."""

    box: Box
    score: float
    tokens: tuple[int, int, int, int]


@torch.no_grad()
def decode_boxes(model: Any, loc: LocTokens, prompts: Sequence[Sequence[int]],
                 image_tokens: torch.Tensor) -> list[tuple[tuple[int, ...], float]]:
    """(four box token ids, mean log-probability) per prompt, greedily, each prompt with its row of
    ``image_tokens`` (N, S, D). Rows are decoded in groups of equal prompt length with a KV cache."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    out: list[Any] = [None] * len(prompts)
    device = image_tokens.device
    for length, rows in groups.items():
        index = torch.tensor(rows, device=device)
        new = torch.tensor([list(prompts[i]) for i in rows], dtype=torch.long, device=device)
        image = image_tokens.index_select(0, index)
        cache = model.new_decode_cache(length + BOX_TOKENS)
        picked, logps = [], []
        for _ in range(BOX_TOKENS):
            logits = model.next_token_logits(new, image, cache)[:, -1].float()
            # every id but the box tokens masked: the softmax over the box tokens alone
            logp = logits[:, loc.base:loc.base + loc.bins].log_softmax(-1)
            best, bin_ = logp.max(-1)
            picked.append(bin_ + loc.base)
            logps.append(best)
            new, image = picked[-1][:, None], None  # the cache holds the prefix and the image's keys / values
        ids = torch.stack(picked, 1).tolist()
        scores = torch.stack(logps, 1).mean(1).tolist()
        for r, i in enumerate(rows):
            out[i] = (tuple(ids[r]), scores[r])
    return out


def _sorted(box: Box) -> Box:
    x0, y0, x1, y1 = box
    return (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))


def locate(model: Any, tok: Any, images: torch.Tensor | Sequence[Any], expressions: str | Sequence[str], *,
           batch_size: int = 32, device: torch.device | str | None = None,
           sizes: Sequence[tuple[int, int]] | None = None) -> list[Located]:
    """The box each expression names in its image, with its score (:class:`Located`). ``images``: PIL images or
    file paths (boxes in their pixels), or a preprocessed (B, 3, H, W) tensor (boxes in its pixels, or in those of
    the original images when their ``sizes`` (width, height) are given). One expression per image (one string:
    the same for every image)."""
    loc = box_tokens(model)
    if isinstance(expressions, str):
        expressions = [expressions] * len(images)
    if len(expressions) != len(images):
        raise GroundingError(f"{len(expressions)} expressions for {len(images)} images: one per image is needed")
    for i, e in enumerate(expressions):
        if not isinstance(e, str) or not e.strip():
            raise GroundingError(f"expression {i}: empty")
    prompts = DecoderPrompts(tok, loc, model.config.text.context_length)
    device = _device(model, device)
    out: list[Located] = []
    with eval_mode(model), torch.no_grad():
        for start, x, places in _batches(model, images, sizes, batch_size, device):
            batch = [prompts.referring_prompt(e) for e in expressions[start:start + len(places)]]
            decoded = decode_boxes(model, loc, batch, model.image_tokens(x))
            in_w, in_h = x.shape[-1], x.shape[-2]
            for (ids, score), place in zip(decoded, places):
                box = _sorted(loc.decode(ids, in_w, in_h))
                out.append(Located(place.to_image(box), score, ids))  # type: ignore[arg-type]
    return out


def ground(model: Any, tok: Any, images: torch.Tensor | Sequence[Any], expressions: str | Sequence[str], *,
           batch_size: int = 32, device: torch.device | str | None = None,
           sizes: Sequence[tuple[int, int]] | None = None) -> list[Box]:
    """The box ``(x0, y0, x1, y1)`` each expression names in its image (pixels of the image; see :func:`locate`,
    which also gives each box's score)."""
    return [r.box for r in locate(model, tok, images, expressions, batch_size=batch_size, device=device,
                                  sizes=sizes)]


# ----------------------------------------------------------------------------------------------------
# Region captions: box -> text
# ----------------------------------------------------------------------------------------------------

def region_in_input(model_or_transform: Any, box: Any, width: int, height: int) -> Box:
    """The part of ``box`` (pixels of a ``width`` x ``height`` image) the model sees, in its input's pixels; a
    GroundingError when ``box`` is not 4 finite numbers with x0 < x1 and y0 < y1 inside the image, or lies wholly in
    what the preprocessing crops off."""
    return _region_in_input(box, Placement.of(model_or_transform, width, height))


def _region_in_input(box: Any, place: Placement) -> Box:
    if not isinstance(box, (list, tuple)) or len(box) != 4 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box):
        raise GroundingError(f"must be 4 numbers (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x0 < x1 and y0 < y1):
        raise GroundingError(f"needs x0 < x1 and y0 < y1, got {list(box)}")
    tol, w, h = EDGE_TOLERANCE, place.width, place.height
    if x0 < -tol or y0 < -tol or x1 > w + tol or y1 > h + tol:
        raise GroundingError(f"{list(box)} is outside the {w}x{h} image")
    inside = place.to_input((x0, y0, x1, y1))
    if inside[2] - inside[0] <= 0 or inside[3] - inside[1] <= 0:
        raise GroundingError(f"{list(box)} lies in the part of the {w}x{h} image the model's preprocessing crops off")
    return inside


def _checked(box: Any, i: int, place: Placement) -> Box:
    try:
        return _region_in_input(box, place)
    except GroundingError as e:
        raise GroundingError(f"box {i}: {e}") from None


def caption_regions(model: Any, tok: Any, images: torch.Tensor | Sequence[Any], boxes: Sequence[Box], *,
                    batch_size: int = 32, device: torch.device | str | None = None,
                    sizes: Sequence[tuple[int, int]] | None = None, config: GenerationConfig | None = None,
                    **kwargs: Any) -> list[str]:
    """A caption of each box's region of its image (one box per image, pixels of the image as in :func:`locate`):
    :func:`~mm.inference.generate.generate` after ``sot describe: x0 y0 x1 y1``, with its settings (``config``
    and / or its fields, ``generator=``); the text is the tokens after the prompt. A box reaching into what the
    preprocessing crops off is cut to what the model sees; one wholly outside it is a GroundingError."""
    loc = box_tokens(model)
    if len(boxes) != len(images):
        raise GroundingError(f"{len(boxes)} boxes for {len(images)} images: one per image is needed")
    prompts = DecoderPrompts(tok, loc, model.config.text.context_length)
    eot = model.config.text.eot_id
    device = _device(model, device)
    out: list[str] = []
    with eval_mode(model), torch.no_grad():
        for start, x, places in _batches(model, images, sizes, batch_size, device):
            in_w, in_h = x.shape[-1], x.shape[-2]
            rows = [prompts.grounded_prompt(_checked(boxes[start + i], start + i, p), in_w, in_h)
                    for i, p in enumerate(places)]
            prompt = torch.tensor(rows, dtype=torch.long, device=device)  # all of one length: sot, 2 words, 4 boxes
            ids = generate(model, x, config, prompt=prompt, **kwargs)
            for row in ids[:, prompt.shape[1]:].tolist():
                out.append(tok.decode(row[: row.index(eot)] if eot in row else row))
    return out
