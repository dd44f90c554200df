"""The run's data: the training stream of this process, where it stands (resumed exactly), and the batches the
executors get (on the device, decoded there with ``data.decode: device``); skipped samples are named in
``skipped_samples.rank{R}.txt`` and counted."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.decode import SampleDecoder
from ..data.locca import DecoderPrompts, LocTokens
from ..data.naflex import TokenBudget
from ..data.retrieved import RetrievalDecoder, RetrievalPrompts
from ..data.views import ViewsDecoder, ViewsSpec
from ..data.gpu import DeferredTrainTransform, GpuImageDecoder, PendingImages
from ..data.transforms import image_transform
from ..data.wds import Collate, ShardStream, check_urls, make_loader, read_keys
from ..models import ImageTextModel
from ..models.patches import Patches
from ..tokenizer import get_tokenizer
from .config import RunConfig


@dataclass
class DataState:
    """What this process has consumed: batches, each worker's stream position, skipped samples."""

    batches: int = 0
    workers: dict[int, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    shapes: str = ""  # a running SHA-256 over the batches' (images, sequence positions): the schedule taken

    def consume(self, meta: dict[str, Any], shape: tuple[int, ...]) -> None:
        if meta.get("index", self.batches) != self.batches:  # the stream and the count disagree: resume is broken
            raise RuntimeError(f"the data stream gave batch {meta['index']} where batch {self.batches} was due")
        self.batches += 1
        self.workers[meta["worker"]] = (meta["epoch"], meta["pos"])
        for reason, n in meta["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n
        self.shapes = hashlib.sha256(f"{self.shapes}{tuple(shape)}".encode()).hexdigest()

    def to_json(self, workers_per_process: int) -> dict[str, Any]:
        return {"batches": self.batches, "workers_per_process": workers_per_process,
                "positions": {str(k): list(v) for k, v in self.workers.items()}, "skipped": self.skipped,
                "shapes": self.shapes}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DataState:
        return cls(d["batches"], {int(k): tuple(v) for k, v in d["positions"].items()}, dict(d["skipped"]),
                   d.get("shapes", ""))


def build_train_stream(cfg: RunConfig, model: ImageTextModel, rank: int, world: int, data: DataState) -> ShardStream:
    mcfg = model.config
    nf, budget = cfg.data.naflex, None
    if nf is not None:  # patch sequences at each image's aspect ratio, batched by a token budget
        transform = image_transform(mcfg, train=True, scale=tuple(cfg.data.crop_scale), seq_len=max(nf.seq_lens),
                                    ratio=tuple(nf.crop_ratio))
        budget = TokenBudget(tuple(nf.seq_lens), nf.max_tokens, cfg.train.seed)
    else:
        transform = image_transform(mcfg, train=True, scale=tuple(cfg.data.crop_scale), ratio=tuple(cfg.data.crop_ratio))
    on_device = cfg.data.decode == "device"
    if on_device:
        transform = DeferredTrainTransform(transform, cfg.data.max_pixels)
    labelled = cfg.finetune is not None  # a fine-tuning run's samples are images and class labels
    kw = dict(image_keys=cfg.data.image_keys, text_key=cfg.data.text_key,
              label_key=cfg.finetune.label_key if labelled else "cls", need=("label",) if labelled else ("text",),
              max_pixels=cfg.data.max_pixels, random_caption=cfg.data.random_caption, raw_image=on_device)
    spec = views_spec(cfg, mcfg)
    r = cfg.data.retrieval
    if r is not None:  # retrieval-augmented captioning: the decoder's sequences hold the sample's retrieved captions
        prompts = RetrievalPrompts(_tok(model), mcfg.text.context_length, r.k, r.caption_tokens)
        decoder: SampleDecoder = RetrievalDecoder(transform, prompts, r.captions, **kw)
    elif spec is not None:  # train.objectives: local crops, patch masks, the decoder's sequences
        prompts = DecoderPrompts(_tok(model), LocTokens.of(mcfg), mcfg.text.context_length) \
            if spec.decoder_tasks else None
        decoder = ViewsDecoder(transform, spec, prompts, **kw)
    else:
        decoder = SampleDecoder(transform, **kw)
    nw = max(1, cfg.data.workers)
    collate = Collate() if labelled else Collate(_tok(model))
    return ShardStream(check_urls(cfg.data.train, "data.train"), decoder, collate, cfg.data.batch_size,
                       seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer, train=True,
                       resampled=cfg.data.resampled, rank=rank, world=world, start=data.workers,
                       rotation=data.batches % nw, budget=budget, first_batch=data.batches,
                       keep=read_keys(cfg.data.keep, "data.keep") if cfg.data.keep else None)


def views_spec(cfg: RunConfig, mcfg) -> ViewsSpec | None:
    """What ``train.objectives`` needs from the data workers (None: nothing beyond the image and caption)."""
    o = cfg.train.objectives
    if o is None:
        return None
    dec = o.decoder
    # plain captions need no sequences of their own; referring / grounded tasks do
    tasks = dec.tasks() if dec is not None and any(k != "caption" for k, _ in dec.tasks()) else ()
    return ViewsSpec(local_views=o.self_distill.local_views if o.self_distill else 0,
                     local_scale=tuple(o.self_distill.local_scale) if o.self_distill else (0.05, 0.4),
                     grid=mcfg.vision.grid, mask_ratio=o.masked.ratio if o.masked else 0.0, decoder_tasks=tasks)


def image_tokens(images: Any, mcfg) -> tuple[int, int]:
    """(patches, sequence positions) of a batch's images: NaFlex patches and their padded length, or a square batch's
    grid (no padding)."""
    if isinstance(images, Patches):
        return int(images.lengths().sum()), images.shape[0] * images.shape[1]
    n = len(images) * (mcfg.vision.image_size // mcfg.vision.patch_size) ** 2
    return n, n


def _tok(model: ImageTextModel):
    tok = get_tokenizer(model)
    if callable(getattr(tok, "load", None)):
        tok.load()  # a Hugging Face tokenizer that cannot load: one line here, not a traceback from each worker
    return tok


class Feed:
    """``open()`` starts the loader (its workers draw their base seed from the global RNG: before the run's RNG
    state is restored); ``next()`` gives the next batch as the executors take it; ``state`` is what checkpoints
    record. ``note(msg)`` reports a skipped sample or a warning."""

    def __init__(self, cfg: RunConfig, core: ImageTextModel, rank: int, world: int, device: torch.device,
                 out_dir: Path):
        self.cfg, self.core, self.rank, self.world, self.device = cfg, core, rank, world, device
        self.out_dir = out_dir
        self.state = DataState()
        self.batches = self.skip_log = self.gpu_decoder = None

    @property
    def workers_per_process(self) -> int:
        return max(1, self.cfg.data.workers)

    def restore(self, data: dict[str, Any] | None, batches: int, same_layout: bool) -> bool:
        """Continue the stream a checkpoint recorded (``same_layout``: as many processes x workers); otherwise
        only count its batches. Returns whether the position was restored."""
        if data and same_layout and data["workers_per_process"] == self.workers_per_process:
            self.state = DataState.from_json(data)
            return True
        self.state.batches = batches
        return False

    def open(self) -> None:
        cfg = self.cfg
        self.skip_log = open(self.out_dir / f"skipped_samples.rank{self.rank}.txt", "a", buffering=1)  # noqa: SIM115 (open for the run; close() closes it)
        loader = make_loader(build_train_stream(cfg, self.core, self.rank, self.world, self.state), cfg.data.workers,
                             cfg.data.prefetch_factor, pin_memory=self.device.type == "cuda")
        v = self.core.config.vision
        self.gpu_decoder = GpuImageDecoder(v.image_size, v.image_mean, v.image_std) \
            if cfg.data.decode == "device" else None
        self.batches = iter(loader)

    def next(self, note) -> dict[str, Any]:
        """The next batch: ``images`` and ``tokens`` (a fine-tuning run's: ``labels``) on the device, ``keys``,
        ``texts``; its skipped samples and warnings go to ``note`` and the skip log."""
        batch = next(self.batches)
        images = batch["images"]
        shape = tuple(images.shape[:2]) if isinstance(images, Patches) else (len(batch["keys"]),)
        self.state.consume(batch["meta"], shape)
        for line in batch["meta"]["bad"]:
            self.skip_log.write(line + "\n")
            note(f"skipped sample {line}")
        for line in batch["meta"].get("bad_parts", ()):  # the sample trains without that part
            self.skip_log.write(line + "\n")
            note(f"left out {line}")
        for w in batch["meta"]["warnings"]:
            note(f"warning: {w}")
        if isinstance(images, PendingImages):
            images = self.gpu_decoder(images, self.device)
        else:
            images = images.to(self.device, non_blocking=True)
        out = {"images": images, "keys": batch["keys"]}
        for k, v in batch.items():  # tokens, labels, and what train.objectives reads (mm/data/views.py)
            if k != "images" and isinstance(v, torch.Tensor):
                out[k] = v.to(self.device, non_blocking=True)
        return {**out, "texts": batch["texts"]} if "texts" in batch else out

    def close(self) -> None:
        if self.skip_log is not None:
            self.skip_log.close()
