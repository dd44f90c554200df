"""What the SigLIP 2 recipe's objectives read besides a sample's image and caption, made in the data workers from the
sample's own random generator (so a resumed run sees exactly the same): local crops of the image (the student's
views in self-distillation), a random patch mask (masked prediction) and the decoder's sequence (LocCa's caption /
referring / grounded task, the sample's regions mapped through its crop).

:class:`ViewsDecoder` is a :class:`~mm.data.decode.SampleDecoder` whose image gives these fields beside ``image``:

- ``local_images`` (V, 3, S, S): ``local_views`` RandomResizedCrops over ``local_scale`` of the area, at the model's
  input size (the global view is ``image``, the run's usual crop);
- ``patch_mask`` (N,) bool, row-major over the patch grid: exactly ``round(ratio * N)`` patches, drawn uniformly;
- ``decoder_tokens`` / ``decoder_targets`` (context,): the task drawn with ``decoder_tasks``' probabilities; a
  referring or grounded task needs a region still visible in the crop (at least half of its box), otherwise the
  sample's caption is the task. Invalid regions (:func:`mm.data.regions.parse_regions`) are left out, each reported
  as a ``bad region`` (``__problems__``: the stream counts and names them and keeps the sample).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from .decode import SampleDecoder
from .locca import DecoderPrompts
from .regions import crop_box, parse_regions
from .transforms import TrainTransform


@dataclass(frozen=True)
class ViewsSpec:
    local_views: int = 0  # local crops per sample (0: none)
    local_scale: tuple[float, float] = (0.05, 0.4)  # their RandomResizedCrop area range
    grid: int = 0  # patches per side of the model's input (for the mask)
    mask_ratio: float = 0.0  # share of the patches masked (0: no mask)
    # the decoder's tasks and their probabilities, e.g. (("caption", 0.5), ("referring", 0.25), ("grounded", 0.25));
    # empty: no decoder sequences
    decoder_tasks: tuple[tuple[str, float], ...] = ()


class ViewsDecoder(SampleDecoder):
    """A SampleDecoder (training: a :class:`~mm.data.transforms.TrainTransform`) whose samples also carry what
    ``spec`` asks for (module docstring). ``prompts`` builds the decoder's sequences (needed with decoder tasks)."""

    def __init__(self, transform: TrainTransform, spec: ViewsSpec, prompts: DecoderPrompts | None = None, **kwargs):
        need = tuple(kwargs.pop("need", ("text",)))
        if spec.decoder_tasks:
            if prompts is None:
                raise ValueError("decoder tasks need DecoderPrompts")
            need = (*need, *(n for n in ("text", "info") if n not in need))
        super().__init__(transform, need=need, **kwargs)
        self.spec, self.prompts = spec, prompts
        self.local = TrainTransform(transform.size, transform.mean.flatten().tolist(),
                                    transform.std.flatten().tolist(), spec.local_scale,
                                    interpolation=transform.interpolation) if spec.local_views else None

    def image_fields(self, img: Any, out: dict[str, Any], rng: random.Random | None) -> dict[str, Any]:
        rng = rng if rng is not None else random.Random(0)
        t, spec = self.transform, self.spec
        if img.mode != "RGB":
            img = img.convert("RGB")
        crop = t.crop_params(img.width, img.height, rng)
        fields: dict[str, Any] = {"image": t.apply(img, crop)}
        if self.local is not None:
            fields["local_images"] = torch.stack([self.local(img, rng) for _ in range(spec.local_views)])
        if spec.mask_ratio > 0:
            n = spec.grid * spec.grid
            mask = torch.zeros(n, dtype=torch.bool)
            mask[rng.sample(range(n), max(1, round(spec.mask_ratio * n)))] = True
            fields["patch_mask"] = mask
        if spec.decoder_tasks:
            fields.update(self._decoder(img, crop, out, rng))
        return fields

    def _decoder(self, img: Any, crop: tuple[int, int, int, int], out: dict[str, Any],
                 rng: random.Random) -> dict[str, Any]:
        size = self.transform.size
        regions, problems = parse_regions(out.get("info") or {}, img.width, img.height)
        visible = [(r, b) for r in regions if (b := crop_box(r.box, crop, size, size)) is not None]
        names, weights = zip(*self.spec.decoder_tasks)
        task = rng.choices(names, weights)[0]
        if task != "caption" and visible:
            region, box = visible[rng.randrange(len(visible))]
            row = self.prompts.referring(region.caption, box, size, size) if task == "referring" \
                else self.prompts.grounded(box, size, size, region.caption)
        else:
            row = self.prompts.caption(out["text"])
        tokens, targets = self.prompts.batch([row])
        fields: dict[str, Any] = {"decoder_tokens": tokens[0], "decoder_targets": targets[0]}
        if problems:
            fields["__problems__"] = [("bad region", p) for p in problems]
        return fields
