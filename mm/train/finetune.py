"""Classification fine-tuning of a model's image tower, and WiSE-FT (``mm finetune``).

The classifier is ``head(encode_image(images, normalize=True))``. The linear head starts as the zero-shot
classifier (Wortsman et al. 2022): its weight is the class text embeddings (``zero_shot_classifier``: class
names x templates, as zero-shot evaluation builds them) times the model's logit scale, its bias zero, so
before the first step the classifier's predictions are the zero-shot predictions. Fine-tuning trains the
image encoder and the head end to end with cross-entropy (AdamW, warmup + cosine, optional layer-wise lr
decay); the text tower is not used.

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

Data as in training (``mm.data.wds``: shuffled shards, train augmentation). Under ``accelerate launch`` each
process reads its own share of the shards (``--batch-size`` is per process), the classifier trains inside
DistributedDataParallel (so the processes keep identical weights), and the main process evaluates and saves
while the others wait; ``results.json`` records the world size and each process's hash of the fine-tuned
weights.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.decode import IMAGE_KEYS, SampleDecoder
from ..data.transforms import image_transform
from ..data.wds import Collate, ShardStream, make_loader
from ..eval.probe import labelled_batches
from ..hub import (
    base_sha256,
)
from ..hub.wrapped import refuse_wrapped
from ..layers.config import LoraConfig
from ..layers.lora import LoraError, add_lora, has_lora, lora_parameters, lora_targets
from ..utils.dist import rank, world_size
from ..utils.nn import eval_mode, params_sha256
from ..utils.precision import PRECISIONS, autocast, autocast_dtype
from .adapt import lr_scales
from .classifier import Classifier, save_classifier, zero_shot_head
from .optim import make_optimizer, make_scheduler
from .step import Stepper


@dataclass
class FinetuneConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 64
    lr: float = 3e-5  # peak learning rate (WiSE-FT's ImageNet recipe)
    weight_decay: float = 0.1
    warmup_steps: int = 50
    min_lr: float = 0.0  # cosine floor
    grad_clip: float | None = 1.0  # max global grad norm; None = off
    label_smoothing: float = 0.0
    layer_decay: float | None = None  # BEiT layer-wise lr decay of the image encoder (head: 1); None = off
    # the head's learning rate is lr * head_lr_mult: a zero-shot head's weights are the logit scale (~14-100)
    # times unit vectors, and a head fitted to normalised embeddings needs much larger ones (see docs)
    head_lr_mult: float = 1.0
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range of the training images
    shuffle_buffer: int = 1000
    workers: int = 2  # image loading processes (0 = in this one)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast)
    seed: int = 0
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite steps before fine-tuning stops (the trainer's policy)
    # LoRA: adapters on the image encoder's layers train (with the head), its base weights stay frozen; targets
    # must lie in the image encoder (vision.KIND, or a one-tower model's transformer.KIND)
    lora: LoraConfig | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        for k in ("steps", "batch_size", "log_every", "max_bad_steps"):
            if getattr(self, k) < 1:
                yield k, f"must be >= 1, got {getattr(self, k)}"
        if self.lr <= 0:
            yield "lr", f"must be > 0, got {self.lr}"
        for k in ("weight_decay", "warmup_steps", "min_lr", "shuffle_buffer", "workers"):
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


def image_encoder_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes ``encode_image`` depends on: the vision tower, and a one-tower model's shared
    stack and image modality embedding."""
    if getattr(model.config, "one_tower", None) is not None:
        return ("vision.", "transformer.", "modality_embed.vision")
    return ("vision.",)


def trainable_names(classifier: Classifier) -> list[str]:
    """Classifier parameter names fine-tuning trains (and WiSE-FT interpolates): image encoder and head; with
    LoRA adapters on the model, the image encoder's adapters (its base weights frozen) and the head."""
    prefixes = tuple("model." + p for p in image_encoder_prefixes(classifier.model))
    adapters = lora_parameters(classifier) if has_lora(classifier.model) else None  # found by module type
    return [n for n, _ in classifier.named_parameters()
            if n.startswith("head.") or (n.startswith(prefixes) and (adapters is None or n in adapters))]


def add_image_adapters(model: nn.Module, lora: LoraConfig) -> list[str]:
    """LoRA adapters on the image-encoder layers ``lora.targets`` select; returns their names. LoraError if the
    model already carries adapters (merge them first) or a target lies outside the image encoder (fine-tuning
    does not use the text tower: adapters there would never train)."""
    if has_lora(model):
        raise LoraError("the model already carries LoRA adapters: merge them into it first (mm merge), then "
                        "fine-tune the merged model")
    names = lora_targets(model, lora)
    prefixes = image_encoder_prefixes(model)
    outside = [n for n in names if not n.startswith(prefixes)]
    if outside:
        raise LoraError(f"lora.targets {lora.targets}: {outside[0]} is not in the image encoder, which is what "
                        f"fine-tuning trains (targets there: {', '.join(p.rstrip('.') for p in prefixes)}.KIND)")
    return add_lora(model, lora, targets=names)


def lora_zero_shot_endpoint(classifier: Classifier, finetuned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """WiSE-FT's zero-shot endpoint for LoRA-fine-tuned adapters: the fine-tuned adapters with their zero factor at
    zero (``lora_B``, an MoE expert adapter's ``B``: the update ``scale * B A`` vanishes, exactly the base).
    ``wise_interpolate(this, finetuned, alpha)`` then keeps every ``A`` and gives ``alpha * B``: update ``alpha *
    delta``, i.e. ``(1 - alpha) W0 + alpha (W0 + delta)``. Entries that are not adapters (the head) are left to the
    caller's zero-shot snapshot. The adapters and their zero factors are ``classifier``'s, found by module type."""
    adapters, zero = lora_parameters(classifier), lora_parameters(classifier, zero_only=True)
    return {n: torch.zeros_like(v) if n in zero else v for n, v in finetuned.items() if n in adapters}


def wise_interpolate(zeroshot: dict[str, torch.Tensor], finetuned: dict[str, torch.Tensor],
                     alpha: float) -> dict[str, torch.Tensor]:
    """WiSE-FT: ``(1 - alpha) * zeroshot + alpha * finetuned`` per tensor (same keys, floating point). Uses
    ``torch.lerp``, exact at the endpoints: alpha 0 returns ``zeroshot``'s values, 1 ``finetuned``'s."""
    if zeroshot.keys() != finetuned.keys():
        raise ValueError(f"the two state dicts hold different tensors: {sorted(set(zeroshot) ^ set(finetuned))[:3]}")
    return {k: torch.lerp(v, finetuned[k].to(v.device), float(alpha)) for k, v in zeroshot.items()}


def snapshot(classifier: Classifier, names: Iterable[str]) -> dict[str, torch.Tensor]:
    params = dict(classifier.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def load_into(classifier: Classifier, state: dict[str, torch.Tensor]) -> None:
    params = dict(classifier.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


# -- evaluation ----------------------------------------------------------------------------------
def classifier_eval(classifier: Classifier, batches: Iterable[dict[str, Any]], *, device: torch.device,
                    autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Top-1 / top-``min(5, C)`` accuracy of ``classifier`` on ``{"images", "labels"}`` batches (one sync)."""
    n_classes = classifier.head.out_features
    k = min(5, n_classes)
    hits = torch.zeros(3, dtype=torch.long, device=device)  # n, top-1, top-k
    with eval_mode(classifier):
        for b in batches:
            labels = b["labels"].to(device).view(-1)
            with autocast(device, autocast_dtype):
                logits = classifier(b["images"].to(device))
            top = logits.float().topk(k, dim=1).indices == labels[:, None]
            hits += torch.stack([torch.tensor(len(labels), device=device), top[:, 0].sum(), top.any(1).sum()])
    n, h1, hk = hits.tolist()
    if n == 0:
        raise ValueError("no labelled test images")
    return {"top1": h1 / n, "top5": hk / n, "n": n}


# -- training ------------------------------------------------------------------------------------
def train_batches(model: nn.Module, urls: list[str], cfg: FinetuneConfig, label_key: str = "cls", *,
                  rank: int = 0, world: int = 1) -> Iterator[dict]:
    """An endless stream of shuffled, augmented ``{"images", "labels"}`` batches (training's reader); process
    ``rank`` of ``world`` reads its own share of the shards."""
    decoder = SampleDecoder(image_transform(model, train=True, scale=tuple(cfg.crop_scale)),
                            image_keys=IMAGE_KEYS, label_key=label_key, need=("label",))
    stream = ShardStream(urls, decoder, Collate(), cfg.batch_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer,
                         rank=rank, world=world)
    return iter(make_loader(stream, cfg.workers))


def finetune(classifier: Classifier, batches: Iterator[dict[str, Any]], cfg: FinetuneConfig, *,
             device: torch.device, log: Callable[[dict[str, Any]], None] | None = None,
             wrap: Callable[[nn.Module], nn.Module] | None = None) -> list[dict[str, Any]]:
    """Train the image encoder and head of ``classifier`` (the rest frozen) for ``cfg.steps`` steps on
    ``batches``; returns the logged records (step, loss, lr, batch accuracy, samples/s). ``wrap``: applied to
    the classifier once its trained parameters are chosen, e.g. DistributedDataParallel (which registers its
    gradient hooks on the parameters that require gradients when it is built); the logged loss, accuracy and
    samples/s are then averaged / summed over the processes. Each step is :class:`mm.train.step.Stepper`'s,
    as in the trainer: autocast at ``cfg.precision``, fp16's scaler, clipping, and the non-finite policy (a bad
    step is skipped; ``cfg.max_bad_steps`` in a row stop fine-tuning)."""
    torch.manual_seed(cfg.seed)
    trained = set(trainable_names(classifier))
    for n, p in classifier.named_parameters():
        p.requires_grad_(n in trained)
    scales = None
    if cfg.layer_decay is not None or cfg.head_lr_mult != 1:
        scales = {f"model.{n}": s for n, s in lr_scales(classifier.model, {}, cfg.layer_decay).items()}
        scales.update({n: cfg.head_lr_mult for n, _ in classifier.head.named_parameters(prefix="head")})
    opt = make_optimizer(classifier, cfg.lr, cfg.weight_decay, (0.9, 0.999), 1e-8, device, scales)
    sched = make_scheduler(opt, cfg.warmup_steps, cfg.steps, cfg.lr, cfg.min_lr)
    n_classes = classifier.head.out_features
    stepper = Stepper(opt, [p for p in classifier.parameters() if p.requires_grad], device=device,
                      precision=cfg.precision, grad_clip=cfg.grad_clip, max_bad_steps=cfg.max_bad_steps,
                      lr_hint="--lr", log=lambda msg: print(msg, flush=True) if rank() == 0 else None)
    forward = wrap(classifier) if wrap is not None else classifier
    world = world_size()
    classifier.train()
    records, t_last, seen = [], time.time(), 0
    for step in range(1, cfg.steps + 1):
        b = next(batches)
        if b["labels"].min() < 0 or b["labels"].max() >= n_classes:
            raise ValueError(f"training label {int(b['labels'].max())} is not a class index (there are {n_classes} "
                             "classes); do the class names belong to these shards?")
        images, labels = b["images"].to(device, non_blocking=True), b["labels"].to(device, non_blocking=True)
        with stepper.autocast():
            logits = forward(images)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
        stepper.backward(loss)
        stepper.step(step)
        sched.step()
        seen += len(labels)
        if step % cfg.log_every == 0 or step == cfg.steps:
            records.append(_record(step, loss, logits, labels, stepper.norm, sched, opt, seen * world / max(
                time.time() - t_last, 1e-9)))
            if log:
                log(records[-1])
            t_last, seen = time.time(), 0
    classifier.eval()
    return records


def _record(step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, norm: torch.Tensor,
            sched, opt, samples_per_s: float) -> dict[str, Any]:
    """A logged step: loss and batch accuracy of the global batch (one all-reduce over the processes)."""
    stats = torch.stack([loss.detach().float() * len(labels), (logits.argmax(1) == labels).sum().float(),
                         torch.tensor(float(len(labels)), device=labels.device)])
    if world_size() > 1:
        torch.distributed.all_reduce(stats)
    total, hits, n = stats.tolist()
    return {"step": step, "loss": total / n, "lr": sched.get_last_lr()[0] / opt.param_groups[0]["lr_scale"],
            "batch_top1": hits / n, "grad_norm": float(norm), "samples_per_s": samples_per_s}


def _ddp(device: torch.device) -> Callable[[nn.Module], nn.Module]:
    def wrap(module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
    return wrap


# -- the command ---------------------------------------------------------------------------------
def _start_lora(model: nn.Module, cfg: FinetuneConfig, base: str | None) -> dict[str, Any]:
    """Adapters on the image encoder (seeded: the same A factors on every process and every run); returns what
    save_classifier records with them: the LoRA config, the base spec and the base's hash (taken before)."""
    saved = {"lora": cfg.lora, "base": base, "base_hash": base_sha256(model)}
    torch.manual_seed(cfg.seed)
    add_image_adapters(model, cfg.lora)
    return saved


def run(model: nn.Module, train_urls: list[str], test_urls: list[str], classnames: Sequence[str],
        templates: Sequence[Any] | None, cfg: FinetuneConfig, alphas: Sequence[float], out: str | Path, *,
        label_key: str = "cls", max_test: int | None = None, save_alpha: float | None = None,
        eval_batch_size: int = 128, log: Callable[[str], None] = print,
        base: str | None = None) -> dict[str, Any] | None:
    """Zero-shot head -> fine-tune -> WiSE-FT test accuracy per alpha; writes ``out/finetuned/``,
    ``out/wise-ALPHA/`` (``save_alpha``), ``out/metrics.jsonl`` and ``out/results.json``. In a process group
    (``accelerate launch``) every process trains on its share of the data; the main process evaluates, writes
    and returns the results, the others return None. With ``cfg.lora`` the adapters are put on ``model`` here
    (seeded, so every process starts from the same ones) and the saved classifiers are adapter directories
    naming ``base`` (the model's spec; None: random weights no spec reproduces)."""
    refuse_wrapped(model, "fine-tuning (mm finetune)")
    if has_lora(model) and cfg.lora is None:
        raise LoraError("the model carries LoRA adapters: merge them into it first (mm.merge_lora / mm merge), or "
                        "fine-tune adapters of its own with cfg.lora")
    dist = torch.distributed
    world, main = world_size(), rank() == 0
    device = next(model.parameters()).device
    adapter = _start_lora(model, cfg, base) if cfg.lora is not None else {}  # save_classifier's LoRA arguments
    out = Path(out)
    if main:
        out.mkdir(parents=True, exist_ok=True)
    classifier = Classifier(model, zero_shot_head(model, classnames, templates, device=device)).to(device)
    names = trainable_names(classifier)
    zeroshot = snapshot(classifier, names)
    n_train = sum(classifier.get_parameter(n).numel() for n in names)
    if main:
        procs = f" x {world} processes" if world > 1 else ""
        what = f"LoRA rank {cfg.lora.rank} adapters on {', '.join(cfg.lora.targets)}" if cfg.lora else "image encoder"
        frozen = "; the base frozen" if cfg.lora else ""
        log(f"fine-tuning {n_train:,} parameters ({what} + head over {len(classnames)} classes{frozen}) for "
            f"{cfg.steps} steps of {cfg.batch_size}{procs} on {device}")
    t0 = time.time()
    with open(out / "metrics.jsonl", "w", buffering=1) if main else nullcontext() as f:
        def log_rec(rec: dict[str, Any]) -> None:
            f.write(json.dumps(rec) + "\n")
            log(f"step {rec['step']}/{cfg.steps}  loss {rec['loss']:.4f}  lr {rec['lr']:.2e}  batch top-1 "
                f"{100 * rec['batch_top1']:.1f}%  {rec['samples_per_s']:.1f} samples/s")

        finetune(classifier, train_batches(model, train_urls, cfg, label_key, rank=rank(), world=world), cfg,
                 device=device, log=log_rec if main else None, wrap=_ddp(device) if world > 1 else None)
    train_s = time.time() - t0
    finetuned = snapshot(classifier, names)
    if cfg.lora is not None:  # WiSE-FT scales the adapters' update (lora_zero_shot_endpoint says why it is exact)
        zeroshot.update(lora_zero_shot_endpoint(classifier, finetuned))
    shas = [params_sha256(classifier)]
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, shas[0])
        shas = gathered
    if not main:
        dist.barrier()  # the main process evaluates and saves
        return None
    if len(set(shas)) != 1:
        log(f"WARNING: the fine-tuned weights differ between processes: {shas}")
    rows = []
    for alpha in alphas:
        load_into(classifier, wise_interpolate(zeroshot, finetuned, alpha))
        batches = labelled_batches(model, test_urls, label_key=label_key, batch_size=eval_batch_size,
                                   workers=cfg.workers, max_samples=max_test)
        r = classifier_eval(classifier, batches, device=device, autocast_dtype=autocast_dtype(cfg.precision))
        rows.append({"alpha": float(alpha), **r})
        log(f"alpha {alpha:.2f}: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  ({r['n']} test images)")
    meta = {"config": asdict(cfg), "templates": None if templates is None else [str(t) for t in templates]}
    load_into(classifier, finetuned)
    save_classifier(classifier, classnames, out / "finetuned", meta, **adapter)
    if save_alpha is not None:
        load_into(classifier, wise_interpolate(zeroshot, finetuned, save_alpha))
        save_classifier(classifier, classnames, out / f"wise-{save_alpha:g}", {**meta, "wise_alpha": save_alpha},
                        **adapter)
        load_into(classifier, finetuned)
    result = {"wise": rows, "train_s": round(train_s, 1), "steps": cfg.steps, "world_size": world,
              "param_sha256": shas, "classes": list(classnames), **meta}
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    if world > 1:
        dist.barrier()
    return result
