"""Zero-shot classification: a classifier from class names x prompt templates, and its accuracy.

The classifier follows CLIP's recipe (as open_clip's ``build_zero_shot_classifier``): every template is
filled with every class name, the texts are encoded and L2-normalised, the templates of a class are
averaged and the mean is normalised again. Column ``c`` of the result is class ``c``'s text embedding.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..utils.nn import eval_mode, model_device
from ..utils.precision import autocast

Template = str | Callable[[str], str]

_JSON_KEYS = {"classnames": "classes", "templates": "templates"}


def _default_templates() -> list[Template]:
    # Imported lazily: open_clip is a dependency for its metadata only, and importing it costs ~1 s.
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return list(OPENAI_IMAGENET_TEMPLATES)


def load_names(spec: Sequence[Any] | str | Path, what: str) -> list[str]:
    """Class names or templates from a list, or from a file: ``.json`` (a list, or a dict holding the list
    under ``"classes"`` / ``"templates"``) or text (one per line, blank lines ignored).

    ``what`` is ``"classnames"`` or ``"templates"``; errors name it and the file. Templates must be
    ``"{}"`` format strings; a list given directly may also hold callables (``lambda c: ...``), which
    are returned as they are.
    """
    if what not in _JSON_KEYS:
        raise ValueError(f"load_names: what must be 'classnames' or 'templates', got {what!r}")
    source = "list"
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        source = str(path)
        if not path.is_file():
            raise FileNotFoundError(f"{what}: file {source!r} does not exist")
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{what}: {source} is not valid JSON ({e})") from None
            if isinstance(data, dict):
                key = _JSON_KEYS[what]
                if key not in data:
                    raise ValueError(f"{what}: {source} has no key {key!r} (keys: {', '.join(map(str, data))})")
                data = data[key]
            if not isinstance(data, list):
                raise ValueError(f"{what}: {source} must hold a list, or a dict with a list under "
                                 f"{_JSON_KEYS[what]!r}; got {type(data).__name__}")
            names = data
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    elif isinstance(spec, Sequence):
        names = list(spec)
    else:
        raise TypeError(f"{what}: expected a list or a file path, got {type(spec).__name__}")

    if not names:
        raise ValueError(f"{what}: {source} is empty")
    for i, name in enumerate(names):
        if what == "templates" and callable(name) and source == "list":
            continue
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{what}: item {i} of {source} is not a non-empty string: {name!r}")
        if what == "templates" and "{}" not in name:
            raise ValueError(f"{what}: item {i} of {source} has no '{{}}' for the class name: {name!r}")
    return names


def _fill(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


def zero_shot_classifier(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    classnames: Sequence[str] | str | Path,
    templates: Sequence[Template] | str | Path | None = None,
    *,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Class embeddings, float32 ``[embed_dim, n_classes]``, unit-norm columns.

    ``templates`` defaults to OpenAI's 80 ImageNet prompts. Texts (class x template pairs) are encoded
    ``batch_size`` at a time, so classes need not divide batches. Any model with
    ``encode_text(tokens, normalize=True)`` works (mm or open_clip), with its own tokenizer.
    """
    classnames = load_names(classnames, "classnames")
    templates = _default_templates() if templates is None else load_names(templates, "templates")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else model_device(model)
    texts = [_fill(t, c) for c in classnames for t in templates]  # class-major: row c*T + t
    with eval_mode(model):
        chunks = []
        for i in range(0, len(texts), batch_size):
            tokens = tokenizer(texts[i:i + batch_size]).to(device)
            # fp32 before averaging: 80 half-precision unit vectors lose bits in the mean
            chunks.append(model.encode_text(tokens, normalize=True).float())
        emb = torch.cat(chunks).view(len(classnames), len(templates), -1)  # (C, T, D)
        weights = F.normalize(emb.mean(dim=1), dim=-1)  # (C, D)
    return weights.T.contiguous()


def _logits(model: Any, classifier: torch.Tensor, images: torch.Tensor, device: torch.device,
            autocast_dtype: torch.dtype | None) -> torch.Tensor:
    with autocast(device, autocast_dtype):
        emb = model.encode_image(images.to(device), normalize=True)
    # similarities outside autocast, in fp32: bf16 logits would create ties between close classes
    return 100.0 * emb.float() @ classifier.to(device=device, dtype=torch.float32)  # (B, C)


def zero_shot_eval(
    model: Any,
    classifier: torch.Tensor,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 accuracy of ``classifier`` (``[embed_dim, n_classes]``) on ``(images, labels)`` batches.

    Returns ``{"zeroshot_top1", "zeroshot_top5", "n", "per_class"}``; top-5 means top-``min(5, n_classes)``.
    ``per_class`` maps each class index that occurs in the labels to ``{"n", "top1", "top5"}`` (accuracies
    as fractions). Labels must lie in ``[0, n_classes)``. Counts stay on the device until the end, so
    the loop never waits for the accelerator.
    """
    device = torch.device(device) if device is not None else model_device(model)
    n_classes = classifier.shape[1]
    k = min(5, n_classes)
    count = torch.zeros(n_classes, dtype=torch.long, device=device)
    hit1 = torch.zeros_like(count)
    hitk = torch.zeros_like(count)
    with eval_mode(model):
        for images, labels in batches:
            labels = torch.as_tensor(labels).to(device=device, dtype=torch.long).view(-1)
            logits = _logits(model, classifier, images, device, autocast_dtype)
            if logits.shape[0] != labels.shape[0]:
                raise ValueError(f"batch has {logits.shape[0]} images but {labels.shape[0]} labels")
            correct = logits.topk(k, dim=1).indices == labels[:, None]  # (B, k)
            count.index_add_(0, labels, torch.ones_like(labels))
            hit1.index_add_(0, labels, correct[:, 0].long())
            hitk.index_add_(0, labels, correct.any(dim=1).long())
    count, hit1, hitk = (t.tolist() for t in torch.stack([count, hit1, hitk]).cpu())  # the one sync
    n = sum(count)
    if n == 0:
        raise ValueError("zero_shot_eval: no samples in batches")
    per_class = {c: {"n": count[c], "top1": hit1[c] / count[c], "top5": hitk[c] / count[c]}
                 for c in range(n_classes) if count[c]}
    return {"zeroshot_top1": sum(hit1) / n, "zeroshot_top5": sum(hitk) / n, "n": n, "per_class": per_class}


def predict(model: Any, classifier: torch.Tensor, images: torch.Tensor, k: int = 5,
            *, autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``min(k, n_classes)`` class probabilities (softmax over ``100 * logits``) and indices, ``(B, k)`` each."""
    device = model_device(model)
    with eval_mode(model):
        probs = _logits(model, classifier, images, device, autocast_dtype).softmax(dim=-1)
        top = probs.topk(min(k, classifier.shape[1]), dim=-1)
    return top.values, top.indices
