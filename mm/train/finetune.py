"""Classification fine-tuning of a model's image tower, and WiSE-FT (``mm finetune``), on the trainer.

The classifier is ``head(encode_image(images, normalize=True))``. The linear head starts as the zero-shot
classifier (Wortsman et al. 2022): its weight is the class text embeddings (``zero_shot_classifier``: class
names x templates, as zero-shot evaluation builds them) times the model's logit scale, its bias zero, so
before the first step the classifier's predictions are the zero-shot predictions. Fine-tuning trains the
image encoder and the head end to end with cross-entropy (AdamW, warmup + cosine, optional layer-wise lr
decay); the text tower is not used.

A fine-tuning run is the trainer's (:mod:`mm.train.trainer`) on a RunConfig with a ``finetune`` section
(:func:`run_config` maps :class:`FinetuneConfig`, the flags of ``mm finetune``, onto it): the same loop, data
stream, step numerics, checkpoints (exact resume, a signal's checkpoint included), precision, DDP and log records as
``mm train``, with the parts :mod:`mm.train.classify` gives it (the model, WiSE-FT as the evaluation) and
:class:`mm.train.tasks.ClassifyTask` as the objective. The run directory holds the trainer's files
(``config.yaml``, ``metrics.jsonl``, TensorBoard events, ``checkpoints/step_N/``, plots) and the classifier in
``finetuned/``, with ``wise-ALPHA/`` and ``results.json``.

WiSE-FT then interpolates every trained tensor (image encoder and head) between the two endpoints,
``theta(alpha) = (1 - alpha) * zero-shot + alpha * fine-tuned``, with ``torch.lerp``, which returns the
endpoints exactly at alpha 0 and 1; the test accuracy is reported for each alpha. Saved classifiers are mm
model directories (the whole CLIP with the image encoder replaced: ``mm zeroshot`` / ``mm embed`` work on
them) plus ``classifier.safetensors`` (the head) and ``classes.json``; :func:`load_classifier` reads them.

With LoRA (``cfg.lora``, ``mm finetune --lora``) the image encoder's base weights stay frozen (out of the
optimizer) and low-rank adapters on its layers train with the head. WiSE-FT then scales the adapters' update:
the zero-shot endpoint is the same adapters with their zero-initialised factor (``lora_B`` / experts' ``B``) at
zero, so interpolating ``B`` alone gives ``W0 + alpha * delta`` (``delta = scale * B A``), exactly WiSE-FT of the
merged weights. A LoRA classifier is saved as an adapter directory (``mm.hub.save_adapter``: the adapters, the
base model it names and that base's SHA-256) plus the head and class names; it loads on the base it names
(:func:`load_classifier`, or ``--model DIR`` for any command).

Under ``accelerate launch`` each process reads its own share of the shards (the batch size is per process), the
model trains inside DistributedDataParallel (the head, the task's, has its gradients averaged by the task), and the
main process evaluates and saves while the others wait; ``results.json`` records the world size and each
process's hash of the fine-tuned weights.

:func:`finetune` runs the same task and step (:class:`~mm.train.tasks.ClassifyTask` through
:class:`~mm.train.executors.PlainStep` and the :class:`~mm.train.step.Stepper`) on batches of your own, in memory:
no data stream, checkpoints or evaluation.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import to_dict, validate
from ..data.wds import make_loader
from ..eval.config import EvalConfig
from ..layers.config import LoraConfig
from ..utils import dist
from ..utils.nn import params_sha256
from ..utils.precision import PRECISIONS
from .adapt import lr_scales
from .classifier import Classifier, load_classifier, save_classifier, zero_shot_head
from .classify import (
    add_image_adapters,
    classifier_eval,
    image_encoder_prefixes,
    load_into,
    lora_zero_shot_endpoint,
    snapshot,
    trainable_names,
    wise_interpolate,
)
from .config import DataConfig, FinetuneSection, RunConfig, TrainConfig
from .executors import PlainStep
from .feed import DataState, build_train_stream
from .optim import make_optimizer, make_scheduler
from .preflight import preflight
from .step import Stepper
from .tasks import ClassifyTask
from .trainer import Trainer

__all__ = ["FinetuneConfig", "add_image_adapters", "classifier_eval", "finetune", "image_encoder_prefixes",
           "load_classifier", "load_into", "lora_zero_shot_endpoint", "run", "run_config", "save_classifier",
           "snapshot", "train_batches", "trainable_names", "wise_interpolate", "zero_shot_head"]

BETAS, EPS = (0.9, 0.999), 1e-8  # AdamW's for fine-tuning (WiSE-FT's recipe; the trainer's defaults are CLIP's)


@dataclass
class FinetuneConfig:
    """How ``mm finetune`` trains (its flags are made from these fields: ``--batch-size`` sets ``batch_size``)."""

    steps: int = 1000  # optimizer steps
    batch_size: int = 64  # images per step and process
    lr: float = 3e-5  # peak learning rate (WiSE-FT's ImageNet recipe)
    weight_decay: float = 0.1  # AdamW's; not applied to biases, norms, embeddings
    warmup_steps: int = 50  # linear warmup from 0, then cosine decay to min_lr
    min_lr: float = 0.0  # cosine floor
    grad_clip: float | None = 1.0  # max global gradient norm (0 or null: off)
    label_smoothing: float = 0.0  # of the cross-entropy
    layer_decay: float | None = None  # layer-wise lr decay of the image encoder, e.g. 0.65 (head: 1); null: off
    # the head's learning rate is lr x this: a zero-shot head's weights are the logit scale (~14-100) times unit
    # vectors, and a head fitted to normalised embeddings needs much larger ones (see docs)
    head_lr_mult: float = 1.0
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range of the training images
    shuffle_buffer: int = 1000  # training samples shuffled per loading process
    workers: int = 2  # image loading processes (0: load in this one)
    precision: str = "fp32"  # autocast: fp32 (none), bf16 or fp16 (CUDA)
    seed: int = 0  # data order, augmentation, LoRA's initial factors, dropout
    log_every: int = 10  # steps between log records
    max_bad_steps: int = 5  # consecutive non-finite steps before fine-tuning stops
    grad_accum: int = 1  # micro-batches per optimizer step
    checkpoint_every: int = 500  # steps between checkpoints in OUT/checkpoints/ (0: only at the end)
    keep_checkpoints: int = 2  # newest checkpoints kept
    # auto: continue from OUT's newest checkpoint (a run stopped by a signal continues when run again); none: start
    # afresh; or a checkpoint directory
    resume: str = "auto"
    stop_after: int | None = None  # stop after this step, with a checkpoint (run again to continue)
    # LoRA: adapters on the image encoder's layers train (with the head), its base weights stay frozen; targets
    # must lie in the image encoder (vision.KIND, or a one-tower model's transformer.KIND)
    lora: LoraConfig | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        for k in ("steps", "batch_size", "log_every", "max_bad_steps", "grad_accum", "keep_checkpoints"):
            if getattr(self, k) < 1:
                yield k, f"must be >= 1, got {getattr(self, k)}"
        if self.lr <= 0:
            yield "lr", f"must be > 0, got {self.lr}"
        for k in ("weight_decay", "warmup_steps", "min_lr", "shuffle_buffer", "workers", "checkpoint_every"):
            if getattr(self, k) < 0:
                yield k, f"must be >= 0, got {getattr(self, k)}"
        if self.grad_clip is not None and self.grad_clip <= 0:
            yield "grad_clip", f"must be > 0 or None, got {self.grad_clip}"
        if not 0 <= self.label_smoothing < 1:
            yield "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            yield "layer_decay", f"must be in (0, 1] or None, got {self.layer_decay}"
        if self.head_lr_mult <= 0:
            yield "head_lr_mult", f"must be > 0, got {self.head_lr_mult}"
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            yield "crop_scale", f"must satisfy 0 < min <= max <= 1, got {self.crop_scale}"
        if self.precision not in PRECISIONS:
            yield "precision", f"must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"
        if self.stop_after is not None and self.stop_after < 1:
            yield "stop_after", f"must be >= 1 or None, got {self.stop_after}"


# -- on the trainer ----------------------------------------------------------------------------------------------
def _data(cfg: FinetuneConfig, train: str) -> DataConfig:
    return DataConfig(train=train, batch_size=cfg.batch_size, workers=cfg.workers, shuffle_buffer=cfg.shuffle_buffer,
                      crop_scale=tuple(cfg.crop_scale))


def _train(cfg: FinetuneConfig) -> TrainConfig:
    return TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps, min_lr=cfg.min_lr,
                       weight_decay=cfg.weight_decay, betas=BETAS, eps=EPS, precision=cfg.precision,
                       grad_accum=cfg.grad_accum, grad_clip=cfg.grad_clip, seed=cfg.seed,
                       label_smoothing=cfg.label_smoothing, checkpoint_every=cfg.checkpoint_every,
                       keep_checkpoints=cfg.keep_checkpoints, resume=cfg.resume, stop_after=cfg.stop_after,
                       max_bad_steps=cfg.max_bad_steps, log_every=cfg.log_every, layer_decay=cfg.layer_decay)


def run_config(cfg: FinetuneConfig, *, model: str, train: str, test: str, out: str | Path, classes: Sequence[str],
               templates: Sequence[str] | None = None, pretrained: str | None = None, adapter: str | None = None,
               label_key: str = "cls", max_test: int | None = None,
               wise_alpha: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0), save_alpha: float | None = None,
               device: str | None = None) -> RunConfig:
    """The trainer's config of a fine-tuning run: ``cfg`` mapped onto the ``data`` and ``train`` sections, the rest
    (what to fine-tune, on which classes, how to score it) into the ``finetune`` section. ``train`` / ``test``: shard
    specs (brace ranges, ``::`` joins); ``out``: the run directory."""
    section = FinetuneSection(model=model, pretrained=pretrained, adapter=adapter, classes=list(classes),
                              templates=None if templates is None else [str(t) for t in templates],
                              label_key=label_key, test=test, max_test=max_test, wise_alpha=list(wise_alpha),
                              save_alpha=save_alpha, head_lr_mult=cfg.head_lr_mult, lora=cfg.lora, device=device)
    return RunConfig(data=_data(cfg, train), train=_train(cfg), eval=EvalConfig(batch_size=128), finetune=section,
                     output_dir=str(out))


def run(cfg: RunConfig) -> dict[str, Any] | None:
    """Fine-tune as ``cfg`` (a RunConfig with a ``finetune`` section, e.g. :func:`run_config`'s) says, on the
    trainer: checked, resumed (``train.resume``), trained, WiSE-FT scored; writes ``results.json`` beside the run's
    files. Returns, on the main process, the results once the run has reached ``train.steps``, or
    ``{"stopped_at": step}`` when it stopped before (a signal, ``train.stop_after``: running it again continues);
    None on the other processes."""
    validate(cfg)
    preflight(cfg)
    t0 = time.time()
    trainer = Trainer(cfg)
    trainer.resume()
    trainer.train()
    if trainer.step < cfg.train.steps:
        return {"stopped_at": trainer.step} if dist.is_main() else None
    # every process's hash of the whole classifier (model and head): DDP keeps them equal
    shas = dist.gather_object(params_sha256(Classifier(trainer.core, trainer.task.head)))
    result = None
    if dist.is_main():
        f = cfg.finetune
        result = {"wise": trainer.evaluator.results["wise"], "train_s": round(time.time() - t0, 1),
                  "steps": cfg.train.steps, "world_size": dist.world_size(), "param_sha256": shas,
                  "classes": list(f.classes), "templates": f.templates, "config": to_dict(cfg)}
        (Path(cfg.output_dir) / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    dist.barrier()  # the processes end together, once the main one has written (none leaves the group early)
    return result


# -- in memory ---------------------------------------------------------------------------------------------------
def train_batches(model: nn.Module, urls: list[str], cfg: FinetuneConfig, label_key: str = "cls", *,
                  rank: int = 0, world: int = 1) -> Iterator[dict]:
    """An endless stream of shuffled, augmented ``{"images", "labels"}`` batches: a fine-tuning run's training
    stream (:func:`mm.train.feed.build_train_stream`); process ``rank`` of ``world`` reads its own share."""
    rc = RunConfig(data=_data(cfg, "::".join(urls)), train=_train(cfg), finetune=FinetuneSection(label_key=label_key))
    return iter(make_loader(build_train_stream(rc, model, rank, world, DataState()), cfg.workers))


def finetune(classifier: Classifier, batches: Iterator[dict[str, Any]], cfg: FinetuneConfig, *,
             device: torch.device, log: Callable[[dict[str, Any]], None] | None = None,
             wrap: Callable[[nn.Module], nn.Module] | None = None) -> list[dict[str, Any]]:
    """Train the image encoder and head of ``classifier`` (the rest frozen) for ``cfg.steps`` steps on
    ``batches`` with a fine-tuning run's task and step; returns the logged records (step, loss, lr, batch accuracy,
    samples/s). ``wrap``: applied to the model once its trained parameters are chosen, e.g.
    DistributedDataParallel (the head trains outside it, its gradients averaged by the task); the logged loss,
    accuracy and samples/s are then averaged / summed over the processes. The step is the trainer's: autocast at
    ``cfg.precision``, fp16's scaler, clipping, and the non-finite policy (a bad step is skipped;
    ``cfg.max_bad_steps`` in a row stop fine-tuning)."""
    torch.manual_seed(cfg.seed)
    task, executor, stepper, sched = _in_memory_parts(classifier, cfg, device, wrap)
    world = dist.world_size()
    classifier.train()
    records, t_last, seen = [], time.time(), 0
    for step in range(1, cfg.steps + 1):
        b = next(batches)
        batch = {k: b[k].to(device, non_blocking=True) for k in ("images", "labels")}
        losses, out = executor.step(batch)
        task.sync_grads()
        stepper.step(step)
        sched.step()
        seen += len(batch["labels"])
        if step % cfg.log_every == 0 or step == cfg.steps:
            records.append(_record(step, losses["loss"], out.logits, batch["labels"], stepper.norm, sched,
                                   seen * world / max(time.time() - t_last, 1e-9)))
            if log:
                log(records[-1])
            t_last, seen = time.time(), 0
    classifier.eval()
    return records


def _in_memory_parts(classifier: Classifier, cfg: FinetuneConfig, device: torch.device,
                     wrap: Callable[[nn.Module], nn.Module] | None) -> tuple[ClassifyTask, PlainStep, Stepper, Any]:
    """What a fine-tuning run's trainer assembles, for an in-memory classifier: the trained parameters chosen, the
    optimizer (the model's groups, then the head's), the scheduler, the stepper and the plain step."""
    trained = set(trainable_names(classifier))
    for n, p in classifier.named_parameters():
        p.requires_grad_(n in trained)
    model, head = classifier.model, classifier.head
    scales = lr_scales(model, {}, cfg.layer_decay) if cfg.layer_decay is not None else None
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, BETAS, EPS, device, scales)
    task = ClassifyTask(head, [str(i) for i in range(head.out_features)], label_smoothing=cfg.label_smoothing,
                        lr_mult=cfg.head_lr_mult)
    for group in task.param_groups(cfg.lr, cfg.weight_decay):
        opt.add_param_group(group)
    sched = make_scheduler(opt, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr)
    stepper = Stepper(opt, [*model.parameters(), *task.parameters()], device=device, precision=cfg.precision,
                      grad_clip=cfg.grad_clip, max_bad_steps=cfg.max_bad_steps, lr_hint="lr",
                      log=lambda msg: print(msg, flush=True) if dist.is_main() else None)
    executor = PlainStep(wrap(model) if wrap is not None else model, task, autocast=stepper.autocast,
                         backward=stepper.backward)
    return task, executor, stepper, sched


def _record(step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor,
            sched, samples_per_s: float) -> dict[str, Any]:
    """A logged step: loss and batch accuracy of the global batch (one all-reduce over the processes)."""
    stats = torch.stack([loss.detach().float() * len(labels), (logits.argmax(1) == labels).sum().float(),
                         torch.tensor(float(len(labels)), device=labels.device)])
    if dist.world_size() > 1:
        torch.distributed.all_reduce(stats)
    total, hits, n = stats.tolist()
    opt = sched.optimizer
    return {"step": step, "loss": total / n, "lr": sched.get_last_lr()[0] / opt.param_groups[0]["lr_scale"],
            "batch_top1": hits / n, "grad_norm": float(norm), "samples_per_s": samples_per_s}


def _ddp(device: torch.device) -> Callable[[nn.Module], nn.Module]:
    def wrap(module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return wrap
