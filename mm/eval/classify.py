"""Zero-shot classification of image files, folders and shards (what ``mm zeroshot`` runs): predictions with
probabilities, accuracy where labels are known, and their CSV / JSON output.

Labels come from the inputs themselves: a folder whose immediate sub-folders are named after the classes
(``photos/cat/``, ``photos/golden_retriever/``), or shards whose samples hold a class index (``cls``). Shards
are read by the evaluator's pipeline (:mod:`mm.eval.runner`), so results match a run's evaluation.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.decode import BadSample
from ..data.folder import IMAGE_SUFFIXES, list_images, load_image
from ..data.transforms import image_transform, stack_images
from ..data.wds import check_urls
from ..tokenizer import get_tokenizer
from .config import ShardReading
from .runner import eval_batches, shard_info
from .zeroshot import Template, load_names, predict, zero_shot_classifier


# -- results -------------------------------------------------------------------------------------
@dataclass
class Prediction:
    """One image's ``k`` most probable classes: ``top`` = [(class index, probability)], best first."""

    image: str  # file path, or the sample key for shards
    label: int | None  # the true class index, when the input says
    top: list[tuple[int, float]]


@dataclass
class ZeroShotResult:
    """Everything ``mm zeroshot`` reports: predictions in input order, skipped images, accuracy."""

    classnames: list[str]
    predictions: list[Prediction]
    skipped: list[str]  # "image: reason" for every image that could not be read
    accuracy: dict[str, Any] | None  # zero_shot_eval's layout; None when no image has a label


class Batch(NamedTuple):
    """Preprocessed images (``None`` when none of the batch could be read), their names and labels
    (``None`` = unknown), and this batch's unreadable images as ``"name: reason"``."""

    images: torch.Tensor | None
    names: list[str]
    labels: list[int | None]
    skipped: list[str]


class Accuracy:
    """Top-1 / top-5 counts of labelled predictions per class; ``result()`` has ``zero_shot_eval``'s layout."""

    def __init__(self, n_classes: int):
        self.count, self.hit1, self.hit5 = [0] * n_classes, [0] * n_classes, [0] * n_classes

    def add(self, label: int, top5: Sequence[int]) -> None:
        self.count[label] += 1
        self.hit1[label] += top5[0] == label
        self.hit5[label] += label in top5

    def result(self) -> dict[str, Any] | None:
        n = sum(self.count)
        if n == 0:
            return None
        per_class = {c: {"n": m, "top1": self.hit1[c] / m, "top5": self.hit5[c] / m}
                     for c, m in enumerate(self.count) if m}
        return {"zeroshot_top1": sum(self.hit1) / n, "zeroshot_top5": sum(self.hit5) / n, "n": n,
                "per_class": per_class}


def zeroshot(model: Any, classnames: Sequence[str], templates: Sequence[Template] | None, batches: Iterable[Batch],
             k: int = 5, *, autocast_dtype: torch.dtype | None = None,
             on_prediction: Callable[[Prediction], None] | None = None,
             on_skip: Callable[[str], None] | None = None) -> ZeroShotResult:
    """Classify ``batches`` against ``classnames`` x ``templates`` (default: OpenAI's ImageNet prompts).

    ``on_prediction`` / ``on_skip`` see each prediction / unreadable image as it comes (streamed output).
    A label outside ``[0, len(classnames))`` is an error naming the image: the labels and the class list
    do not belong together, and every accuracy would be wrong.
    """
    W = zero_shot_classifier(model, get_tokenizer(model), list(classnames), templates)
    acc, preds, skipped = Accuracy(len(classnames)), [], []
    for batch in batches:
        for s in batch.skipped:
            skipped.append(s)
            if on_skip:
                on_skip(s)
        if batch.images is None:
            continue
        # at least 5, so that top-5 accuracy is known whatever k is printed
        probs, idx = predict(model, W, batch.images, max(k, 5), autocast_dtype=autocast_dtype)
        for name, label, p, i in zip(batch.names, batch.labels, probs.tolist(), idx.tolist()):
            if label is not None:
                if not 0 <= label < len(classnames):
                    raise ValueError(f"{name}: label {label} is not a class index (there are {len(classnames)} "
                                     "classes); do the class names belong to these labels?")
                acc.add(label, i[:5])
            preds.append(Prediction(name, label, list(zip(i[:k], p[:k]))))
            if on_prediction:
                on_prediction(preds[-1])
    return ZeroShotResult(list(classnames), preds, skipped, acc.result())


# -- image files and folders ---------------------------------------------------------------------
def _key(name: str) -> str:
    """Folder names match class names ignoring case, with ``_`` and ``-`` read as spaces."""
    return " ".join(name.replace("_", " ").replace("-", " ").lower().split())


def label_images(inputs: Sequence[str | Path], classnames: Sequence[str] | None = None, *,
                 names: Mapping[str, str] | None = None) -> tuple[list[str], list[tuple[Path, int | None]]]:
    """The class names and the images of ``inputs`` with their labels (``None`` = unknown).

    A folder with sub-folders is a class folder: each immediate sub-folder holds one class's images
    (searched recursively); images lying directly in it are unlabelled. With ``classnames`` every
    sub-folder must name one of them; without, the sub-folder names (``_`` read as a space) become the
    classes. Image files and folders without sub-folders are unlabelled. Raises FileNotFoundError /
    ValueError naming the problem: a missing path, a sub-folder that is no class, no classes at all (``names``:
    the caller's name for ``classnames`` there, ``{"classnames": "--classes"}`` for the commands).
    """
    classes = list(classnames or [])
    index: dict[str, int] = {}
    for i, c in enumerate(classes):
        if _key(c) in index:
            raise ValueError(f"classes {classes[index[_key(c)]]!r} and {c!r} are the same name to folder matching "
                             "(case and _ / - are ignored)")
        index[_key(c)] = i
    items: list[tuple[Path, int | None]] = []
    for spec in inputs:
        path = Path(spec)
        subdirs = sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")) \
            if path.is_dir() else []
        if not subdirs:
            items += [(f, None) for f in list_images([path])]
            continue
        items += [(f, None) for f in sorted(path.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES]
        for d in subdirs:
            if _key(d.name) not in index:
                if classnames is not None:
                    raise ValueError(f"folder {d}: {d.name!r} is not one of the classes ({', '.join(classes)}); "
                                     f"sub-folders of {path} are read as class names (pass {d} itself to classify "
                                     "its images without labels)")
                index[_key(d.name)] = len(classes)
                classes.append(d.name.replace("_", " "))
            items += [(f, index[_key(d.name)]) for f in list_images([d])]
    if not classes:
        raise ValueError(f"no class names: give {(names or {}).get('classnames', 'classnames')}, or a folder whose "
                         "sub-folders are named after the classes")
    if not items:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    return classes, items


class _ImageFiles(Dataset):
    """(path, label, tensor or None, reason): unreadable images are reported, not raised, so a worker
    process never dies on one bad file."""

    def __init__(self, items: Sequence[tuple[Path, int | None]], transform: Callable[..., torch.Tensor]):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, int | None, torch.Tensor | None, str]:
        path, label = self.items[i]
        try:
            return str(path), label, self.transform(load_image(path)), ""
        except BadSample as e:
            return str(path), label, None, str(e)


def _collate(items: list[tuple[str, int | None, torch.Tensor | None, str]]) -> Batch:
    good = [it for it in items if it[2] is not None]
    return Batch(stack_images([it[2] for it in good]) if good else None, [it[0] for it in good],
                 [it[1] for it in good], [f"{it[0]}: {it[3]}" for it in items if it[2] is None])


def folder_batches(model: Any, items: Sequence[tuple[Path, int | None]], batch_size: int = 64,
                   workers: int = 0, seq_len: int | None = None) -> DataLoader:
    """Batches of ``items`` (from :func:`label_images`) in the model's eval preprocessing (``seq_len``: NaFlex
    patches, each image at its own aspect ratio)."""
    return DataLoader(_ImageFiles(items, image_transform(model, train=False, seq_len=seq_len)), batch_size=batch_size,
                      num_workers=workers, collate_fn=_collate)


# -- shards --------------------------------------------------------------------------------------
def resolve_shards(spec: str | list[str], classnames: Sequence[str] | None, templates: Sequence[Template] | None,
                   what: str, *, names: Mapping[str, str] | None = None,
                   ) -> tuple[list[str], list[str], Sequence[Template] | None]:
    """Shard URLs (local files checked), class names and templates, the last two defaulting to the
    ``info.json`` beside the shards (templates then to OpenAI's). Errors name the shards by ``what`` and
    ``classnames`` by ``names["classnames"]`` (default: ``classnames``): the caller's names for them."""
    urls = check_urls(spec, what)
    info = shard_info(urls)
    if classnames is None:
        if not info.get("classes"):
            raise ValueError(f"{what}: no class names: give {(names or {}).get('classnames', 'classnames')}, or put "
                             f"\"classes\" into the info.json beside the shards ({urls[0]})")
        classnames = load_names(info["classes"], "classnames")
    if templates is None and info.get("templates"):
        templates = load_names(info["templates"], "templates")
    return urls, list(classnames), templates


def shard_batches(model: Any, urls: list[str], label_key: str | None = "cls", batch_size: int = 64,
                  workers: int = 0, seq_len: int | None = None) -> Iterator[Batch]:
    """Batches of the shards' samples (``label_key=None``: unlabelled); skipped samples are named by
    ``shard:key: reason``, cut-off shards by a warning."""
    notes: list[str] = []
    for b in eval_batches(model, urls, ("label",) if label_key else (), batch_size=batch_size,
                          reading=ShardReading(workers=workers, seq_len=seq_len), label_key=label_key or "cls",
                          on_meta=lambda m: notes.extend(m["warnings"] + m["bad"])):
        labels = b["labels"].tolist() if label_key else [None] * len(b["keys"])
        yield Batch(b["images"], b["keys"], labels, notes[:])
        notes.clear()
    if notes:  # skipped after the last batch of images
        yield Batch(None, [], [], notes)


# -- output --------------------------------------------------------------------------------------
def accuracy_table(result: ZeroShotResult) -> str:
    """Overall top-1 / top-5 and a (class, n, top-1) row per labelled class; "" without labels."""
    acc = result.accuracy
    if acc is None:
        return ""
    width = max(5, *(len(result.classnames[c]) for c in acc["per_class"]))
    lines = [(f"top-1 {100 * acc['zeroshot_top1']:.2f}%  top-5 {100 * acc['zeroshot_top5']:.2f}%  "
              f"({acc['n']} labelled images)"), f"{'class':{width}s}  {'n':>6s}  {'top-1':>7s}"]
    lines += [f"{result.classnames[c]:{width}s}  {r['n']:6d}  {100 * r['top1']:6.2f}%"
              for c, r in acc["per_class"].items()]
    return "\n".join(lines)


def prediction_line(p: Prediction, classnames: Sequence[str]) -> str:
    return "\t".join([p.image] + [f"{classnames[c]} {prob:.4f}" for c, prob in p.top])


def to_json(result: ZeroShotResult) -> dict[str, Any]:
    """Class indices replaced by names throughout."""
    names = result.classnames
    acc = result.accuracy
    if acc is not None:
        acc = {**acc, "per_class": {names[c]: r for c, r in acc["per_class"].items()}}
    return {"classes": names, "accuracy": acc, "skipped": result.skipped,
            "predictions": [{"image": p.image, "label": None if p.label is None else names[p.label],
                             "top": [{"class": names[c], "prob": prob} for c, prob in p.top]}
                            for p in result.predictions]}


def write_predictions(result: ZeroShotResult, path: Path) -> None:
    """``.json``: :func:`to_json`; ``.csv``: image, label, then class_i, prob_i for each of the top k."""
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps(to_json(result), indent=1))
        return
    k = max((len(p.top) for p in result.predictions), default=0)
    names = result.classnames
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"] + [f"{col}_{i}" for i in range(1, k + 1) for col in ("class", "prob")])
        for p in result.predictions:
            w.writerow([p.image, "" if p.label is None else names[p.label]]
                       + [x for c, prob in p.top for x in (names[c], prob)])
