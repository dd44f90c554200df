"""The classifier ``mm finetune`` trains and saves: ``head(model.encode_image(images, normalize=True))``, its head
started as the zero-shot classifier, and its files (an mm model directory, or with LoRA an adapter directory,
plus ``classifier.safetensors`` and ``classes.json``)."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..eval.zeroshot import zero_shot_classifier
from ..hub import (
    PretrainedError,
    is_adapter_dir,
    load_model,
    load_pretrained,
    save_adapter,
    save_pretrained,
)
from ..layers.config import LoraConfig
from ..tokenizer import get_tokenizer

HEAD_NAME, CLASSES_NAME = "classifier.safetensors", "classes.json"


class Classifier(nn.Module):
    """``head(model.encode_image(images, normalize=True))``: logits ``(B, n_classes)``."""

    def __init__(self, model: nn.Module, head: nn.Linear):
        super().__init__()
        self.model, self.head = model, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.model.encode_image(images, normalize=True))


def zero_shot_head(model: nn.Module, classnames: Sequence[str], templates: Sequence[Any] | None = None,
                   *, device: str | torch.device | None = None) -> nn.Linear:
    """The zero-shot classifier as a Linear layer: weight ``logit_scale.exp() * W.T`` (``W``: normalised class
    text embeddings, ``[embed_dim, n_classes]``), bias 0. Its argmax is zero-shot classification's."""
    W = zero_shot_classifier(model, get_tokenizer(model), list(classnames), templates, device=device)
    head = nn.Linear(W.shape[0], W.shape[1]).to(W.device)
    with torch.no_grad():
        head.weight.copy_(model.logit_scale.detach().float().exp() * W.T)
        head.bias.zero_()
    return head


# -- saving --------------------------------------------------------------------------------------
def save_classifier(classifier: Classifier, classnames: Sequence[str], directory: str | Path,
                    extra: dict[str, Any] | None = None, *, lora: LoraConfig | None = None,
                    base: str | None = None, base_hash: str | None = None) -> Path:
    """An mm model directory (``save_pretrained``) plus the head and the class names. With ``lora`` (a LoRA
    fine-tune): an adapter directory instead (``save_adapter``: the adapters alone, naming ``base``, the base model
    spec, and ``base_hash``, its ``base_sha256``), which loads on that base."""
    if lora is not None:
        d = save_adapter(classifier.model, directory, lora, base=base, base_hash=str(base_hash))
    else:
        d = save_pretrained(classifier.model, directory)
    save_head(classifier.head, d)
    save_classes(classnames, d, extra)
    return d


def save_head(head: nn.Linear, directory: str | Path) -> None:
    """The head's weight and bias as ``classifier.safetensors`` (a classifier directory's, a checkpoint's)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(state, str(Path(directory) / HEAD_NAME))


def load_head(head: nn.Linear, directory: str | Path) -> None:
    from safetensors.torch import load_file

    head.load_state_dict(load_file(str(Path(directory) / HEAD_NAME)))


def save_classes(classnames: Sequence[str], directory: str | Path, extra: dict[str, Any] | None = None) -> None:
    """``classes.json``: the class names in label order, plus ``extra`` (what the classifier was trained with)."""
    (Path(directory) / CLASSES_NAME).write_text(json.dumps({"classes": list(classnames), **(extra or {})}, indent=1))


def load_classifier(directory: str | Path, device: str | torch.device = "cpu",
                    pretrained: str | Path | None = None) -> tuple[Classifier, list[str]]:
    """The classifier and class names :func:`save_classifier` wrote, in eval mode. A LoRA classifier (an adapter
    directory) loads on the base model it names, the adapters unmerged (``pretrained``: the weights file of a
    preset base, as ``mm finetune --pretrained`` took it); the base weights are checked (AdapterError)."""
    from safetensors.torch import load_file

    d = Path(directory)
    if not (d / HEAD_NAME).is_file():
        raise PretrainedError(f"{d / HEAD_NAME}: missing (not a directory written by mm finetune)")
    lora = is_adapter_dir(d) and not (d / "config.json").is_file()
    model = load_model(d, pretrained, warn_random=False) if lora else load_pretrained(d)
    sd = load_file(str(d / HEAD_NAME))
    head = nn.Linear(sd["weight"].shape[1], sd["weight"].shape[0])
    head.load_state_dict(sd)
    classes = json.loads((d / CLASSES_NAME).read_text())["classes"]
    return Classifier(model, head).to(device).eval(), classes
