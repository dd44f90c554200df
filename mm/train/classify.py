"""The parts a classification fine-tuning run (``mm finetune``; RunConfig's ``finetune`` section) gives the trainer in
place of an image-text run's: the model (the base to fine-tune, its image encoder trained, LoRA adapters on it) and
the evaluation (WiSE-FT on the test split, which also saves the chosen interpolation). The objective is
:class:`mm.train.tasks.ClassifyTask`, whose head is the zero-shot classifier to start with; the labelled stream is
the feed's (:mod:`mm.train.feed`).

WiSE-FT (Wortsman et al. 2022) interpolates every trained tensor (image encoder and head) between the zero-shot
and the fine-tuned classifier, ``theta(alpha) = (1 - alpha) * zero-shot + alpha * fine-tuned``, with ``torch.lerp``,
exact at alpha 0 and 1. With LoRA the zero-shot endpoint is the same adapters with their zero-initialised factor at
zero, so interpolating it alone scales the update: ``W0 + alpha * delta``, exactly WiSE-FT of the merged weights.
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.wds import check_urls
from ..hub import is_adapter_dir, load_model, parse_spec
from ..hub.wrapped import refuse_wrapped
from ..layers.config import LoraConfig
from ..layers.lora import LoraError, add_lora, has_lora, lora_parameters, lora_targets, merge_lora
from ..utils import dist
from ..utils.nn import eval_mode
from ..utils.precision import autocast, autocast_dtype
from .classifier import Classifier
from .config import FinetuneSection, RunConfig
from .metrics import RunMetrics

WHAT = "fine-tuning (mm finetune)"  # what refusals name


def image_encoder_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Parameter-name prefixes ``encode_image`` depends on: the vision tower, and a one-tower model's shared
    stack and image modality embedding."""
    if getattr(model.config, "one_tower", None) is not None:
        return ("vision.", "transformer.", "modality_embed.vision")
    return ("vision.",)


def image_encoder_names(model: nn.Module) -> list[str]:
    """The model's parameters fine-tuning trains: its image encoder's, or with LoRA adapters on the model, the
    image encoder's adapters (its base weights frozen)."""
    prefixes = image_encoder_prefixes(model)
    adapters = lora_parameters(model) if has_lora(model) else None  # found by module type
    return [n for n, _ in model.named_parameters() if n.startswith(prefixes) and (adapters is None or n in adapters)]


def trainable_names(classifier: Classifier) -> list[str]:
    """Classifier parameter names fine-tuning trains (and WiSE-FT interpolates): the image encoder's (or its
    adapters') and the head's."""
    model = set(image_encoder_names(classifier.model))
    return [n for n, _ in classifier.named_parameters() if n.startswith("head.") or n.removeprefix("model.") in model]


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


def snapshot(classifier: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    params = dict(classifier.named_parameters())
    return {n: params[n].detach().clone() for n in names}


def load_into(classifier: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(classifier.named_parameters())
    with torch.no_grad():
        for n, v in state.items():
            params[n].copy_(v)


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


# -- the run's model ---------------------------------------------------------------------------------------------
def adapted(f: FinetuneSection) -> bool:
    """Whether the model comes with a LoRA adapter (``adapter``, or ``model`` an adapter directory): it is
    fine-tuned merged."""
    return f.adapter is not None or (is_adapter_dir(f.model) and not Path(f.model, "config.json").is_file())


def adapter_base(f: FinetuneSection) -> str | None:
    """What a LoRA fine-tune's adapter names as its base: a model directory (absolute, found from anywhere),
    open_clip:NAME[:TAG], or a preset / config with ``pretrained`` (which must be given again to reload it);
    None for random weights, which no spec reproduces."""
    s = parse_spec(f.model)
    if s.kind == "dir":
        return str(s.path.resolve())
    return f.model if s.kind == "open_clip" or f.pretrained else None


def build_base(cfg: RunConfig, device: torch.device) -> nn.Module:
    """The model a fine-tuning run trains the image encoder of: ``finetune.model`` loaded on ``device`` (an adapter
    merged into it), with ``finetune.lora``'s adapters on its image encoder (seeded by ``train.seed``: the same
    factors on every process and every run), only the image encoder (or its adapters) requiring gradients."""
    f = cfg.finetune
    model = load_model(f.model, f.pretrained, device, adapter=f.adapter)
    if adapted(f):  # fine-tuning trains (and saves) ordinary weights: the adapter folded in
        merge_lora(model)
    refuse_wrapped(model, WHAT)
    if has_lora(model) and f.lora is None:
        raise LoraError("the model carries LoRA adapters: merge them into it first (mm.merge_lora / mm merge), or "
                        "fine-tune adapters of its own with finetune.lora")
    if f.lora is not None:
        torch.manual_seed(cfg.train.seed)
        add_image_adapters(model, f.lora)
    trained = set(image_encoder_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n in trained)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


# -- the run's evaluation ----------------------------------------------------------------------------------------
class WiseEvaluator:
    """A fine-tuning run's evaluation, at its end: WiSE-FT's test accuracy at each ``finetune.wise_alpha``, and the
    classifier at ``save_alpha`` saved as ``wise-ALPHA/`` (by the run's state and task, as its final directory is).
    The zero-shot endpoint is taken when this is made, before a checkpoint is resumed. ``run`` is called by every
    process; the main one evaluates while the others wait (a model directory is the main process's to write)."""

    everywhere = False  # only the main process needs the whole model
    enabled = True

    def __init__(self, cfg: RunConfig, device: torch.device, metrics: RunMetrics, state: Any, task: Any):
        self.cfg, self.device, self.metrics, self.state, self.task = cfg, device, metrics, state, task
        clf = Classifier(state.core, task.head)
        self.names = trainable_names(clf)
        self.zeroshot = snapshot(clf, self.names)
        self.results: dict[str, Any] = {}

    def run(self, model: nn.Module, step: int, periodic: bool = False) -> dict[str, Any]:
        if periodic:  # WiSE-FT needs the fine-tuned endpoint: only at the end
            return {}
        if dist.is_main():
            self.results = self._wise(Classifier(model, self.task.head), step)
        dist.barrier()
        return self.results if dist.is_main() else {}

    def _wise(self, clf: Classifier, step: int) -> dict[str, Any]:
        from ..eval.probe import labelled_batches

        f, t = self.cfg.finetune, self.cfg.train
        finetuned, zeroshot = snapshot(clf, self.names), dict(self.zeroshot)
        if f.lora is not None:  # WiSE-FT scales the adapters' update (lora_zero_shot_endpoint says why it is exact)
            zeroshot.update(lora_zero_shot_endpoint(clf, finetuned))
        rows = []
        for alpha in f.wise_alpha:
            load_into(clf, wise_interpolate(zeroshot, finetuned, alpha))
            batches = labelled_batches(clf.model, check_urls(f.test, "finetune.test"), label_key=f.label_key,
                                       batch_size=self.cfg.eval.batch_size, workers=self.cfg.data.workers,
                                       max_samples=f.max_test)
            r = classifier_eval(clf, batches, device=self.device, autocast_dtype=autocast_dtype(t.precision))
            rows.append({"alpha": float(alpha), **r})
            self.metrics.info(f"alpha {alpha:.2f}: top-1 {100 * r['top1']:.2f}%  top-5 {100 * r['top5']:.2f}%  "
                              f"({r['n']} test images)")
        if f.save_alpha is not None:
            load_into(clf, wise_interpolate(zeroshot, finetuned, f.save_alpha))
            out = Path(self.cfg.output_dir) / f"wise-{f.save_alpha:g}"
            self.state.save_final(out, clf.model)
            self.task.save_final(out, {"wise_alpha": f.save_alpha})
        load_into(clf, finetuned)
        self.metrics.log({"step": step, "wise": rows}, show=False)
        return {"wise": rows}
