"""``mm benchmark``: LAION clip_benchmark's evaluations (``clip_benchmark eval``) run by mm on any model mm loads,
writing result files that merge with clip_benchmark's own.

Datasets are clip_benchmark's webdataset layout (``clip_benchmark_export_wds``): a directory holding
``{split}/*.tar`` (``{split}/nshards.txt`` + ``0.tar .. n-1.tar`` as clip_benchmark reads them; without
nshards.txt every ``*.tar`` in numeric order), ``classnames.txt`` (line i = class i), ``zeroshot_classification_
templates.txt`` (``{c}`` marks the class name: ``str.format(c=...)``) and ``dataset_type.txt`` (``retrieval``,
else classification). Samples hold an image (``webp``, ``png``, ``jpg``, ``jpeg``: the first present, in that
order), ``cls`` (class index) or ``txt`` (captions, one per line). A torchvision-style image folder (class
sub-folders in sorted order, optionally under ``{split}/``; names from ``classnames.txt`` when there is one, else
the folder names) is a classification dataset too. Missing templates fall back to OpenAI's 80 ImageNet prompts.
The task defaults to clip_benchmark's ``--task auto``: ``sugar_crepe*`` / ``winoground`` select captions, a
``retrieval`` dataset type retrieves, anything else classifies.

Tasks and metrics, as clip_benchmark 1.6.2 defines them (``metrics/*.py``):

- ``zeroshot_classification``: ``acc1``, ``acc5`` (top-k accuracy over all images; ``acc5`` is NaN with fewer than 5
  classes, written as ``NaN``, which Python's json, and so clip_benchmark's ``build``, reads);
  ``mean_per_class_recall`` (the mean over the classes that occur in the labels of each class's top-1 recall:
  sklearn's ``balanced_accuracy_score``).
- ``zeroshot_retrieval``: ``image_retrieval_recall@k`` (text -> image: a caption is a hit if its image is among its
  top k) and ``text_retrieval_recall@k`` (image -> text: an image is a hit if ANY of its captions is among its top
  k), k in 1, 5, 10 (clip_benchmark's default is ``--recall_k 5`` only).
- ``linear_probe``: ``lp_acc1``, ``lp_acc5``, ``lp_mean_per_class_recall`` and the settings (``weight_decay``
  chosen, ``epochs``, ``seed``, ``fewshot_k``, ``normalized``) of a linear classifier on the unit image features
  of the train split (:mod:`mm.eval.benchmark_probe`: its AdamW training, cosine schedule and weight-decay search).
- ``captioning``: ``Bleu_1`` .. ``Bleu_4``, ``ROUGE_L``, ``CIDEr`` as pycocoevalcap names them (coco-caption's
  arithmetic, :mod:`mm.eval.caption_metrics`); METEOR and SPICE (Java + Stanford CoreNLP models) are not computed.
- ``image_caption_selection``: ``acc`` / ``text_acc`` (the first of a sample's captions is its most similar),
  ``image_acc``.

Every task encodes its split(s) first (:func:`encode`) and computes its metrics from the features; under
``accelerate launch`` each process encodes every world_size-th shard (or image file) and the features are gathered,
so N GPUs encode N times as fast and the metrics are those of one process.

Result files: one per (dataset, model, task), named as clip_benchmark's default ``--output`` template
``{dataset}_{pretrained}_{model}_{language}_{task}.json`` with its fields (dataset, model, pretrained, task,
metrics, language ``en``), so ``clip_benchmark build`` reads them next to its own. A model is named as
clip_benchmark names it where there is an equivalent: ``open_clip:NAME:TAG`` -> (NAME, TAG); a preset or config
with ``--pretrained FILE`` -> (preset, FILE; the file's basename in the file name, as clip_benchmark does);
an mm model directory -> (its path, ""). ``/`` in names becomes ``_`` in file names.

The summary (``results.csv`` / ``results.md``) has a row per (model, dataset, task) and, per model, an average
of one main metric per task, as DataComp averages its 38 tasks: ``acc1`` for classification (not the mean
per-class recall: acc1 is what papers and clip_benchmark's tables lead with), the mean of image and text
recall@1 for retrieval (both directions count, and @1 is the least saturated), ``lp_acc1``, ``CIDEr`` and ``acc``.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.folder import list_images
from ..data.wds import shard_keys
from ..hub.spec import parse_spec
from ..inference.generate import GenerationConfig, generate
from ..tokenizer import get_tokenizer
from ..utils import dist
from ..utils.io import atomic_write, write_json_atomic
from ..utils.nn import eval_mode, model_device
from ..utils.precision import autocast
from ..utils.progress import Progress
from .caption_metrics import caption_scores
from .classify import folder_batches
from .config import ShardReading
from .retrieval import recall_at_k
from .runner import eval_batches
from .zeroshot import zero_shot_classifier

TASKS = ("zeroshot_classification", "zeroshot_retrieval", "linear_probe", "captioning", "image_caption_selection")
# the metric of each task that the average takes (retrieval: the mean of image and text recall@1)
MAIN_METRIC = {"zeroshot_classification": "acc1", "linear_probe": "lp_acc1", "captioning": "CIDEr",
               "image_caption_selection": "acc"}
IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")  # clip_benchmark's order: the first present is the image
RECALL_KS = (1, 5, 10)
LANGUAGE = "en"
CLASSIFICATION_METRICS = ("acc1", "acc5", "mean_per_class_recall")
RETRIEVAL_METRICS = tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in RECALL_KS)


class BenchmarkError(ValueError):
    """A dataset, suite or task the benchmark cannot run, with a message naming the file or value at fault."""


# -- datasets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """A resolved dataset: ``name`` as results record it, ``path`` its directory (a local Path) or base URL (a str:
    http(s) / file, read as clip_benchmark reads a remote ``--dataset_root``), ``kind`` ``wds`` / ``folder``."""

    name: str
    path: Path | str
    kind: str
    split: str
    dataset_type: str  # "classification" or "retrieval" (dataset_type.txt)

    @property
    def remote(self) -> bool:
        return isinstance(self.path, str)

    def location(self, *parts: str) -> Path | str:
        """A file of the dataset: a local path, or the URL under the base URL."""
        return "/".join([self.path, *parts]) if self.remote else self.path.joinpath(*parts)

    def read_text(self, *parts: str) -> str | None:
        """A small text file of the dataset (class names, templates, type, shard count); None when it is not there."""
        where = self.location(*parts)
        if self.remote:
            return _fetch_text(where)
        return where.read_text(encoding="utf-8") if where.is_file() else None

    @property
    def slug(self) -> str:
        return self.name.removeprefix("wds/").replace("/", "_")

    @property
    def default_task(self) -> str:
        """clip_benchmark's ``--task auto``: SugarCrepe / Winoground select captions, a retrieval type retrieves."""
        short = self.name.removeprefix("wds/")
        if short.startswith("sugar_crepe") or short == "winoground":
            return "image_caption_selection"
        return "zeroshot_retrieval" if self.dataset_type == "retrieval" else "zeroshot_classification"


def is_url(spec: str) -> bool:
    """A dataset (or dataset root) given by URL: http(s) or file, as clip_benchmark's remote ``--dataset_root``."""
    return spec.startswith(("http://", "https://", "file://"))


def _base_url(url: str) -> str:
    # a Hugging Face dataset page (clip_benchmark's own roots) serves its files under resolve/, not tree/
    if url.startswith("https://huggingface.co/datasets/"):
        url = url.replace("/tree/main", "/resolve/main")
    return url.rstrip("/")


_fetched: dict[str, str | None] = {}


def _fetch_text(url: str) -> str | None:
    """A small text file by URL (kept for the process: a suite reads the same class names once); None for a 404
    (an optional file that is not there), any other failure an error naming the URL."""
    if url not in _fetched:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                _fetched[url] = r.read().decode("utf-8")
        except urllib.error.HTTPError as e:
            if e.code != 404:
                raise BenchmarkError(f"{url}: HTTP {e.code} {e.reason}") from None
            _fetched[url] = None
        except FileNotFoundError:  # file:// of a missing file
            _fetched[url] = None
        except (urllib.error.URLError, OSError, UnicodeDecodeError) as e:
            raise BenchmarkError(f"{url}: cannot be read ({getattr(e, 'reason', e)})") from None
    return _fetched[url]


def resolve_dataset(spec: str, root: str | None = None, split: str = "test") -> Dataset:
    """``wds/NAME`` (or ``NAME``) under ``root``, or a directory path, or a URL. ``root`` may be a template as
    clip_benchmark's ``--dataset_root`` (``{dataset}``, ``{dataset_cleaned}``: the directory itself); a plain
    ``root`` holds ``NAME/``. A path that exists wins over a name. A dataset by URL (``spec`` or ``root`` http(s) /
    file, e.g. clip_benchmark's ``https://huggingface.co/datasets/clip-benchmark/wds_{dataset_cleaned}/tree/main``)
    is a webdataset whose ``{split}/nshards.txt`` says how many shards to stream, as clip_benchmark reads one."""
    if is_url(spec):
        base = _base_url(spec)
        parts = base.split("/")
        parts = parts[:-2] if parts[-2:] == ["resolve", "main"] else parts
        return _remote_dataset(f"wds/{parts[-1].removeprefix('wds_')}", base, split)
    if Path(spec).is_dir() and not spec.startswith("wds/"):
        path = Path(spec)
        is_wds = _split_shards(path, split) is not None
        name = f"wds/{path.resolve().name}" if is_wds else path.resolve().name
    else:
        short = spec.removeprefix("wds/")
        if root is None:
            raise BenchmarkError(f"dataset {spec!r}: no such directory, and no dataset root to find it under")
        if "{dataset" in root:
            where = root.format(dataset=short, dataset_cleaned=short.replace("/", "-"))
        else:
            where = f"{root.rstrip('/')}/{short}" if is_url(root) else str(Path(root) / short)
        if is_url(where):
            return _remote_dataset(f"wds/{short}", _base_url(where), split)
        path = Path(where)
        if not path.is_dir():
            raise BenchmarkError(f"dataset {spec!r}: directory {path} does not exist")
        name = f"wds/{short}"
    kind = "wds" if _split_shards(path, split) is not None else "folder"
    type_file = path / "dataset_type.txt"
    dataset_type = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    if dataset_type not in ("classification", "retrieval"):
        raise BenchmarkError(f"{type_file}: dataset type {dataset_type!r} is not supported (classification, retrieval)")
    if kind == "folder" and not _class_dirs(_folder_root(path, split)):
        raise BenchmarkError(f"dataset {spec!r}: {path} holds neither {split}/*.tar shards nor class sub-folders")
    return Dataset(name, path, kind, split, dataset_type)


def _remote_dataset(name: str, base: str, split: str) -> Dataset:
    ds = Dataset(name, base, "wds", split, "classification")
    dataset_type = (ds.read_text("dataset_type.txt") or "classification").strip().lower()
    if dataset_type not in ("classification", "retrieval"):
        raise BenchmarkError(f"{ds.location('dataset_type.txt')}: dataset type {dataset_type!r} is not supported "
                             "(classification, retrieval)")
    ds = replace(ds, dataset_type=dataset_type)
    shard_urls(ds)  # the split is there: its nshards.txt reads
    return ds


def _split_shards(path: Path, split: str) -> list[Path] | None:
    d = path / split
    if (d / "nshards.txt").is_file():
        return [d / f"{i}.tar" for i in range(int((d / "nshards.txt").read_text().strip()))]
    tars = sorted(d.glob("*.tar"), key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))
    return tars or None


def shard_urls(ds: Dataset, split: str | None = None) -> list[str]:
    """The shards of ``split`` (default: the dataset's) in clip_benchmark's order; a missing one (or a split with
    none) is an error naming it. A dataset by URL lists ``0.tar .. n-1.tar`` from its ``{split}/nshards.txt``."""
    split = split or ds.split
    if ds.remote:
        text = ds.read_text(split, "nshards.txt")
        where = ds.location(split, "nshards.txt")
        if text is None:
            raise BenchmarkError(f"{where}: not found (a dataset read by URL needs its split's shard count)")
        try:
            n = int(text.strip())
        except ValueError:
            raise BenchmarkError(f"{where}: {text.strip()[:40]!r} is not a shard count") from None
        return [ds.location(split, f"{i}.tar") for i in range(n)]
    paths = _split_shards(ds.path, split)
    if paths is None:
        raise BenchmarkError(f"{ds.path}: split {split!r} has no shards ({split}/*.tar)")
    for p in paths:
        if not p.is_file():
            raise BenchmarkError(f"{ds.path}: shard {p} is missing ({split}/nshards.txt lists {len(paths)})")
    return [str(p) for p in paths]


def sample_count(ds: Dataset, split: str, share: slice = slice(None)) -> int | None:
    """How many samples ``share`` of the split's shards (or image files) holds, for a progress bar with a time left:
    local shards are counted from their tar headers (distinct keys; no image is read); None for a dataset by URL."""
    if ds.remote:
        return None
    if ds.kind == "folder":
        return len(list_images(_class_dirs(_folder_root(ds.path, split)))[share])
    n = 0
    for url in shard_urls(ds, split)[share]:
        keys = shard_keys(url)  # the tar headers: no member's data is read
        if keys is None:
            return None  # reading it will name the problem
        n += len(keys)
    return n


def _folder_root(path: Path, split: str) -> Path:
    return path / split if (path / split).is_dir() else path


def _class_dirs(path: Path) -> list[Path]:
    return sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def classnames(ds: Dataset) -> list[str]:
    """``classnames.txt`` (line i = class i); an image folder without one: its class folders' names."""
    f = ds.location("classnames.txt")
    text = ds.read_text("classnames.txt")
    if ds.kind == "folder" and text is None:
        return [d.name.replace("_", " ") for d in _class_dirs(_folder_root(ds.path, ds.split))]
    if text is None:
        raise BenchmarkError(f"{ds.path}: no classnames.txt (one class name per line, line i = class i), which "
                             "classification needs")
    names = [line.strip() for line in text.splitlines()]
    while names and not names[-1]:
        names.pop()
    for i, n in enumerate(names):
        if not n:
            raise BenchmarkError(f"{f}: line {i + 1} is empty (line i names class i)")
    if not names:
        raise BenchmarkError(f"{f} is empty")
    return names


def templates(ds: Dataset) -> list[Callable[[str], str]] | None:
    """``zeroshot_classification_templates.txt`` as callables (its ``{c}`` is clip_benchmark's placeholder);
    None without one (OpenAI's ImageNet prompts)."""
    f = ds.location("zeroshot_classification_templates.txt")
    text = ds.read_text("zeroshot_classification_templates.txt")
    if text is None:
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    try:
        for t in lines:
            t.format(c="x")
    except (KeyError, IndexError, ValueError) as e:
        raise BenchmarkError(f"{f}: template {t!r} is not a format string with {{c}} ({e!r})") from None
    return [lambda c, t=t: t.format(c=c) for t in lines] or None


# -- reading -------------------------------------------------------------------------------------
# Every task first encodes its split(s) into an Encoded (image features and what the task needs beside them), then
# computes its metrics from that alone. Under `accelerate launch` each process encodes its share of the shards (or
# image files) and the shares are gathered on every process, so every process holds the same Encoded; the
# metrics are computed from it the same way as in one process.
@dataclass
class Encoded:
    """One split, encoded: unit fp32 image features on the CPU, and per image its key, its label (classification)
    or its captions (retrieval, selection, captioning); ``texts`` the unit features of all captions in order,
    ``owners`` the image of each; ``generated`` a caption per image (captioning)."""

    keys: list[str]
    images: torch.Tensor
    labels: torch.Tensor | None = None
    captions: list[list[str]] | None = None
    texts: torch.Tensor | None = None
    owners: torch.Tensor | None = None
    generated: list[str] | None = None


@dataclass(frozen=True)
class TaskOptions:
    """How the tasks run: batch size, loader processes, autocast; the linear probe's settings (clip_benchmark's
    ``--train_split``, ``--val_split`` / ``--val_proportion``, ``--fewshot_k``, ``--fewshot_lr``, ``--fewshot_epochs``,
    ``--seed``, with its defaults) and the captioning generation."""

    batch_size: int = 64
    workers: int = 0
    autocast_dtype: torch.dtype | None = None
    train_split: str = "train"
    val_split: str | None = None
    val_proportion: float | None = None
    fewshot_k: int = -1
    fewshot_lr: float = 0.1
    fewshot_epochs: int = 10
    seed: int = 0
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    progress: bool = True  # a bar (terminal) / lines (logs) while encoding


def _check_meta(ds: Dataset) -> Callable[[dict[str, Any]], None]:
    """A benchmark scores the whole set or nothing: a cut-off shard or an unusable sample is an error."""
    def check(meta: dict[str, Any]) -> None:
        if meta["warnings"]:
            raise BenchmarkError(f"{ds.name}: {meta['warnings'][0].split('; the rest of this shard')[0]}")
        if meta["bad"]:
            raise BenchmarkError(f"{ds.name}: unusable sample {meta['bad'][0]}")
    return check


def _raw_batches(model: Any, ds: Dataset, split: str, need: str, opts: TaskOptions
                 ) -> Iterator[tuple[torch.Tensor, list[Any], list[str]]]:
    """(images, labels or caption lists, keys) of this process's share of ``split``: every world_size-th shard
    (or image file), starting at its rank."""
    rank, world = dist.rank(), dist.world_size()
    if ds.kind == "wds":
        urls = shard_urls(ds, split)[rank::world]
        if not urls:
            return
        for b in eval_batches(model, urls, ("label",) if need == "label" else ("text",), batch_size=opts.batch_size,
                              reading=ShardReading(workers=opts.workers, image_keys=IMAGE_KEYS),
                              on_meta=_check_meta(ds)):
            yield b["images"], (b["labels"].view(-1).tolist() if need == "label" else
                                [t.splitlines() for t in b["texts"]]), b["keys"]
        return
    if need != "label":
        raise BenchmarkError(f"{ds.path}: an image folder has no captions; this task needs webdataset shards with txt")
    dirs = _class_dirs(_folder_root(ds.path, split))
    n_classes = len(classnames(ds))
    if len(dirs) != n_classes:
        raise BenchmarkError(f"{ds.path}: classnames.txt lists {n_classes} classes but there are {len(dirs)} "
                             "class folders")
    items = [(f, i) for i, d in enumerate(dirs) for f in list_images([d])]
    if not items:
        raise BenchmarkError(f"{_folder_root(ds.path, split)}: no images in its class folders")
    for b in folder_batches(model, items[rank::world], opts.batch_size, opts.workers):
        if b.skipped:
            raise BenchmarkError(f"unreadable image {b.skipped[0]}")
        yield b.images, list(b.labels), list(b.names)


def _encode_share(model: Any, ds: Dataset, split: str, need: str, opts: TaskOptions, device: torch.device, tok: Any,
                  n_classes: int | None, eot: int | None, progress: Progress, text_features: bool,
                  generate_captions: bool) -> tuple:
    keys, feats, labels, caps, texts, gen = [], [], [], [], [], []
    for images, targets, bkeys in _raw_batches(model, ds, split, need, opts):
        images = images.to(device)
        with autocast(device, opts.autocast_dtype):
            emb = model.encode_image(images, normalize=True)
        feats.append(F.normalize(emb.float(), dim=-1))  # kept on the device: no sync per batch
        keys += bkeys
        if need == "label":
            for key, y in zip(bkeys, targets):
                if not 0 <= y < n_classes:
                    raise BenchmarkError(f"{ds.path}: sample {key} has label {y}, but classnames.txt lists "
                                         f"{n_classes} classes (labels 0..{n_classes - 1})")
            labels += targets
        else:
            for key, c in zip(bkeys, targets):
                if not c:
                    raise BenchmarkError(f"{ds.name}: sample {key} has no caption (its txt is empty)")
            caps += targets
        if text_features:
            flat = [c for cs in targets for c in cs]
            for j in range(0, len(flat), 256):
                with autocast(device, opts.autocast_dtype):
                    t = model.encode_text(tok(flat[j:j + 256]).to(device), normalize=True)
                texts.append(F.normalize(t.float(), dim=-1))
        if generate_captions:
            with autocast(device, opts.autocast_dtype):
                ids = generate(model, images, opts.generation)
            for row in ids.tolist():
                gen.append(tok.decode(row[: row.index(eot)] if eot in row else row))
        progress.update(len(bkeys))
    return (keys, torch.cat(feats).cpu() if feats else None, labels, caps, torch.cat(texts).cpu() if texts else None,
            gen)


@torch.no_grad()
def encode(model: Any, ds: Dataset, split: str, need: str, opts: TaskOptions, *, text_features: bool = False,
           generate_captions: bool = False) -> Encoded:
    """Encode ``split`` of ``ds``: ``need`` is ``label`` (labels checked against classnames.txt) or ``captions``;
    ``text_features`` also encodes every caption, ``generate_captions`` captions every image."""
    device = model_device(model)
    tok = get_tokenizer(model) if text_features or generate_captions else None
    n_classes = len(classnames(ds)) if need == "label" else None
    eot = model.config.text.eot_id if generate_captions else None
    total = sample_count(ds, split, slice(dist.rank(), None, dist.world_size())) if opts.progress else None
    progress = Progress(total, "image", enabled=opts.progress and dist.is_main(), every=30)
    try:
        part = _encode_share(model, ds, split, need, opts, device, tok, n_classes, eot, progress, text_features,
                             generate_captions)
    except BenchmarkError as e:  # shared, so that no process waits for one that failed
        part = str(e)
    finally:
        progress.close()
    shares = dist.gather_object(part) if dist.is_dist() else [part]
    for share in shares:
        if isinstance(share, str):
            raise BenchmarkError(share)
    keys = [k for s in shares for k in s[0]]
    if not keys:
        raise BenchmarkError(f"{ds.name}: split {split!r} has no samples")
    out = Encoded(keys, torch.cat([s[1] for s in shares if s[1] is not None]))
    if need == "label":
        out.labels = torch.tensor([y for s in shares for y in s[2]], dtype=torch.long)
    else:
        out.captions = [c for s in shares for c in s[3]]
    if text_features:
        out.texts = torch.cat([s[4] for s in shares if s[4] is not None])
        out.owners = torch.tensor([i for i, cs in enumerate(out.captions) for _ in cs], dtype=torch.long)
    if generate_captions:
        out.generated = [g for s in shares for g in s[5]]
    return out


# -- tasks ---------------------------------------------------------------------------------------
def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """clip_benchmark's ``acc1``, ``acc5`` (NaN with fewer than 5 classes) and ``mean_per_class_recall`` (the mean,
    over the classes present in ``labels``, of each class's top-1 recall: sklearn's ``balanced_accuracy_score``)."""
    top = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hit = top == labels[:, None]
    present = labels.unique()
    recall = [hit[labels == c, 0].double().mean().item() for c in present]
    return {"acc1": hit[:, 0].double().mean().item(),
            "acc5": hit.any(dim=1).double().mean().item() if logits.shape[1] >= 5 else math.nan,
            "mean_per_class_recall": sum(recall) / len(recall)}


def zeroshot_classification(model: Any, ds: Dataset, opts: TaskOptions) -> dict[str, float]:
    """clip_benchmark's zero-shot classifier (per class the renormalised mean of its templates' unit text
    features) scored with :func:`classification_metrics`; logits in fp32 (autocast only encodes)."""
    names = classnames(ds)
    W = zero_shot_classifier(model, get_tokenizer(model), names, templates(ds), device=model_device(model))
    enc = encode(model, ds, ds.split, "label", opts)
    return classification_metrics(100.0 * enc.images @ W.float().cpu(), enc.labels)


def zeroshot_retrieval(model: Any, ds: Dataset, opts: TaskOptions) -> dict[str, float]:
    """clip_benchmark's ``image_retrieval_recall@k`` / ``text_retrieval_recall@k``; a sample's ``txt`` holds its
    captions, one per line."""
    enc = encode(model, ds, ds.split, "captions", opts, text_features=True)
    r = recall_at_k(enc.images, enc.texts, enc.owners, RECALL_KS)
    out = {f"image_retrieval_recall@{k}": r[f"t2i_r{k}"] for k in RECALL_KS}
    out.update({f"text_retrieval_recall@{k}": r[f"i2t_r{k}"] for k in RECALL_KS})
    return out


def image_caption_selection(model: Any, ds: Dataset, opts: TaskOptions) -> dict[str, float]:
    """clip_benchmark's ``image_caption_selection`` (SugarCrepe-style sets, in its webdataset layout: one image and
    its candidate captions, the true one first): ``text_acc`` = the fraction of images whose most similar caption
    is the first; ``image_acc`` = the fraction of first captions whose most similar image (of the sample's one)
    is its own, always 1 here as in clip_benchmark; ``acc`` = both."""
    enc = encode(model, ds, ds.split, "captions", opts, text_features=True)
    text_ok = []
    for i in range(len(enc.keys)):
        scores = enc.texts[enc.owners == i] @ enc.images[i]
        text_ok.append(int(scores.argmax()) == 0)
    text_acc = sum(text_ok) / len(text_ok)
    return {"image_acc": 1.0, "text_acc": text_acc, "acc": text_acc}


def has_decoder(model: Any) -> bool:
    return hasattr(model, "next_token_logits") and getattr(getattr(model, "config", None), "decoder", None) is not None


def captioning(model: Any, ds: Dataset, opts: TaskOptions) -> dict[str, float]:
    """clip_benchmark's captioning metrics as pycocoevalcap names them: ``Bleu_1`` .. ``Bleu_4``, ``ROUGE_L``,
    ``CIDEr`` (CIDEr-D), from a caption generated per image (``opts.generation``) against the sample's captions
    (:mod:`mm.eval.caption_metrics`: coco-caption's arithmetic). METEOR and SPICE, which need Java and Stanford
    CoreNLP models, are not computed."""
    if not has_decoder(model):
        raise BenchmarkError("captioning needs a model with a captioning decoder (a CoCa model); this one has none")
    enc = encode(model, ds, ds.split, "captions", opts, generate_captions=True)
    s = caption_scores(enc.generated, enc.captions)
    return {"Bleu_1": s["bleu1"], "Bleu_2": s["bleu2"], "Bleu_3": s["bleu3"], "Bleu_4": s["bleu4"],
            "ROUGE_L": s["rouge_l"], "CIDEr": s["cider"]}


def linear_probe(model: Any, ds: Dataset, opts: TaskOptions) -> dict[str, float]:
    """clip_benchmark's linear probe (:mod:`mm.eval.benchmark_probe`): features of ``opts.train_split`` (a
    ``opts.val_proportion`` share of it held out, or ``opts.val_split``, for the weight-decay search; neither: weight
    decay 0, as clip_benchmark) train a linear classifier scored on the dataset's split."""
    from .benchmark_probe import linear_probe as probe

    train = encode(model, ds, opts.train_split, "label", opts)
    val = encode(model, ds, opts.val_split, "label", opts) if opts.val_split else None
    if val is None and opts.val_proportion is not None:
        n = len(train.keys)
        n_val = round(n * opts.val_proportion)
        if not 0 < n_val < n:
            raise BenchmarkError(f"val_proportion {opts.val_proportion}: {n} training samples cannot be split so")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(opts.seed))
        val = Encoded([train.keys[i] for i in perm[:n_val]], train.images[perm[:n_val]], train.labels[perm[:n_val]])
        train = Encoded([train.keys[i] for i in perm[n_val:]], train.images[perm[n_val:]],
                        train.labels[perm[n_val:]])
    test = encode(model, ds, ds.split, "label", opts)
    try:
        return probe(train.images, train.labels, test.images, test.labels,
                     val.images if val is not None else None, val.labels if val is not None else None,
                     fewshot_k=opts.fewshot_k, lr=opts.fewshot_lr, epochs=opts.fewshot_epochs,
                     batch_size=opts.batch_size, seed=opts.seed, device=model_device(model),
                     autocast_dtype=opts.autocast_dtype)
    except ValueError as e:  # e.g. a few-shot k larger than a class
        raise BenchmarkError(f"{ds.name}: linear_probe: {e}") from None


TASK_FUNCTIONS: dict[str, Callable[[Any, Dataset, TaskOptions], dict[str, Any]]] = {
    "zeroshot_classification": zeroshot_classification, "zeroshot_retrieval": zeroshot_retrieval,
    "linear_probe": linear_probe, "captioning": captioning, "image_caption_selection": image_caption_selection}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise BenchmarkError(f"unknown task {task!r} (mm benchmark runs: {', '.join(TASKS)})")
    return task


def main_metric(task: str, metrics: dict[str, float]) -> float:
    """The one number per task that the average takes (module docstring)."""
    if task == "zeroshot_retrieval":
        return (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2
    return metrics[MAIN_METRIC[task]]


# -- models and result files ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A model spec with its weights file / adapter (a command's ``--model`` / ``--pretrained`` / ``--adapter``, a
    suite's ``{model, pretrained, adapter}``), and the (model, pretrained) names results record."""

    spec: str
    pretrained: str | None = None
    adapter: str | None = None

    @property
    def names(self) -> tuple[str, str]:
        s = parse_spec(self.spec)
        if s.kind == "open_clip":
            model, pretrained = s.name, s.tag or ""
        else:
            model, pretrained = self.spec.rstrip("/"), self.pretrained or ""
        if self.adapter:
            model = f"{model}+{self.adapter.rstrip('/')}"
        return model, pretrained

    @property
    def label(self) -> str:
        extra = [f"{k} {v}" for k, v in (("pretrained", self.pretrained), ("adapter", self.adapter)) if v]
        return f"{self.spec} ({', '.join(extra)})" if extra else self.spec


def result_name(ds: Dataset, ref: ModelRef, task: str) -> str:
    """clip_benchmark's ``{dataset}_{pretrained}_{model}_{language}_{task}.json`` (a weights file by its basename)."""
    model, pretrained = ref.names
    if pretrained and os.path.isfile(pretrained):
        pretrained = os.path.basename(pretrained)
    return f"{ds.slug}_{pretrained.replace('/', '_')}_{model.replace('/', '_')}_{LANGUAGE}_{task}.json"


def result_record(ds: Dataset, ref: ModelRef, task: str, metrics: dict[str, float]) -> dict[str, Any]:
    model, pretrained = ref.names
    return {"dataset": ds.name, "model": model, "pretrained": pretrained, "task": task, "metrics": metrics,
            "language": LANGUAGE}


# -- suites --------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One (dataset, model, task) to run; ``dataset`` stays a spec until the plan resolves it."""

    dataset: str
    model: ModelRef
    task: str | None  # None: the dataset's own (dataset_type.txt)


@dataclass
class Suite:
    models: list[ModelRef] = field(default_factory=list)
    datasets: list[tuple[str, list[str] | None]] = field(default_factory=list)  # (spec, tasks or None = its own)
    dataset_root: str | None = None


def _model_ref(item: Any, where: str) -> ModelRef:
    if isinstance(item, str):
        return ModelRef(item)
    if isinstance(item, dict) and isinstance(item.get("model"), str) and set(item) <= {"model", "pretrained", "adapter"}:
        return ModelRef(item["model"], item.get("pretrained"), item.get("adapter"))
    raise BenchmarkError(f"{where}: a model is a string or {{model: M, pretrained: FILE, adapter: DIR}}, got {item!r}")


def _tasks(value: Any, where: str) -> list[str] | None:
    if value is None:
        return None
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list) or not value:
        raise BenchmarkError(f"{where}: tasks must be a task name or a list of them, got {value!r}")
    return [str(t) for t in value]  # checked per entry (an unknown one fails its entries, the others still run)


def load_suite(path: str | Path, what: str | None = None) -> Suite:
    """A suite YAML (errors start with the path, after ``what``, the caller's name for it: ``mm benchmark``'s
    ``--suite``)::

        dataset_root: /data/wds            # optional (``--dataset-root`` overrides it)
        models: [open_clip:ViT-B-32:openai, {model: ViT-B-32, pretrained: b32.safetensors}]   # optional
        tasks: [zeroshot_classification]   # optional default for every dataset; else each dataset's own
        datasets:
          - wds/cifar10
          - {dataset: wds/flickr8k, tasks: [zeroshot_retrieval]}
    """
    import yaml

    path = Path(path)
    where = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise BenchmarkError(f"{where}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BenchmarkError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise BenchmarkError(f"{where}: needs a non-empty 'datasets' list")
    unknown = set(data) - {"dataset_root", "models", "tasks", "datasets"}
    if unknown:
        raise BenchmarkError(f"{where}: unknown key {sorted(unknown)[0]!r} (keys: dataset_root, models, "
                             "tasks, datasets)")
    default = _tasks(data.get("tasks"), f"{path}: tasks")
    datasets = []
    for i, d in enumerate(data["datasets"]):
        where = f"{path}: datasets[{i}]"
        if isinstance(d, str):
            datasets.append((d, default))
        elif isinstance(d, dict) and isinstance(d.get("dataset"), str) and set(d) <= {"dataset", "task", "tasks"}:
            datasets.append((d["dataset"], _tasks(d.get("tasks", d.get("task")), where) or default))
        else:
            raise BenchmarkError(f"{where}: a dataset is a string or {{dataset: NAME, tasks: [...]}}, got {d!r}")
    models = [_model_ref(m, f"{path}: models[{i}]") for i, m in enumerate(data.get("models") or [])]
    root = data.get("dataset_root")
    if root is not None:  # relative to the suite file, so a suite travels with its data
        root = root if "://" in str(root) or Path(root).is_absolute() else str(path.parent / root)
    return Suite(models, datasets, root)


def entries(models: Sequence[ModelRef], datasets: Sequence[tuple[str, list[str] | None]]) -> list[Entry]:
    """Every (model, dataset, task), models outermost: each model is loaded once."""
    return [Entry(d, m, t) for m in models for d, tasks in datasets for t in (tasks or [None])]


# -- running -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    entry: Entry
    dataset: Dataset | None = None
    task: str | None = None
    path: Path | None = None
    record: dict[str, Any] | None = None
    error: str | None = None
    skipped: bool = False  # the result existed


def _plan(entry: Entry, root: str | None, split: str, output: Path, opts: TaskOptions) -> Outcome:
    """Resolve and check an entry before any model loads: a typo costs no model load."""
    ds = resolve_dataset(entry.dataset, root, split)
    task = check_task(entry.task) if entry.task else ds.default_task
    if task in ("zeroshot_classification", "linear_probe"):
        classnames(ds)
    splits = [split]
    if task == "linear_probe":
        splits += [opts.train_split] + ([opts.val_split] if opts.val_split else [])
    for s in splits:
        if ds.kind == "wds":
            shard_urls(ds, s)
        elif s != split and not (ds.path / s).is_dir():
            raise BenchmarkError(f"{ds.path}: linear_probe needs a {s!r} split ({ds.path / s}/ with class folders)")
    return Outcome(entry, ds, task, output / result_name(ds, entry.model, task))


def check_entry(entry: Entry, root: str | None = None, split: str = "test",
                options: TaskOptions | None = None) -> tuple[Dataset, str]:
    """What :func:`run_benchmark` checks of an entry before any model loads: its Dataset and task, or a
    BenchmarkError naming the problem (``eval.benchmark`` checks a suite with it before training)."""
    o = _plan(entry, root, split, Path("."), options or TaskOptions())
    return o.dataset, o.task


def _eta(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def run_benchmark(todo: Sequence[Entry], load: Callable[[ModelRef], Any], output: str | Path, *,
                  dataset_root: str | None = None, split: str = "test", batch_size: int = 64, workers: int = 0,
                  autocast_dtype: torch.dtype | None = None, options: TaskOptions | None = None,
                  overwrite: bool = False, errors: tuple[type[BaseException], ...] = (),
                  log: Callable[[str], None] = print) -> list[Outcome]:
    """Run every entry whose result file is not in ``output`` yet (all with ``overwrite``), writing each result as
    it is done (a killed run resumes where it stopped). ``load(ref)`` gives a model; ``errors`` (besides
    BenchmarkError / FileNotFoundError) are the ones a bad entry may raise: it is reported in its outcome and the
    others still run. ``options`` sets the tasks' other settings (its batch size, workers and autocast are the
    arguments'). Logs a line per entry with the time left, estimated from the entries computed so far.

    Under ``accelerate launch`` every process calls this: each encodes its share of every split, all compute the
    same metrics, and the main process (which decides what is pending) writes the files and logs."""
    opts = replace(options or TaskOptions(), batch_size=batch_size, workers=workers, autocast_dtype=autocast_dtype)
    output = Path(output)
    main = dist.is_main()
    if main:
        output.mkdir(parents=True, exist_ok=True)
    catch = (BenchmarkError, FileNotFoundError, *errors)
    outcomes = []
    for e in todo:
        try:
            outcomes.append(_plan(e, dataset_root, split, output, opts))
        except catch as err:
            outcomes.append(Outcome(e, error=str(err)))
    pending = [i for i, o in enumerate(outcomes) if o.error is None and (overwrite or not o.path.is_file())]
    pending = set(dist.gather_object(pending)[0])  # the main process's view of the output directory
    models: dict[ModelRef, Any] = {}
    spent, done = 0.0, 0
    say = log if main else (lambda line: None)
    if dist.world_size() > 1:
        say(f"{dist.world_size()} processes share the encoding")
    for i, o in enumerate(outcomes):
        what = f"[{i + 1}/{len(outcomes)}] {o.entry.dataset} {o.task or o.entry.task or ''} {o.entry.model.label}"
        if o.error is None and i not in pending:
            o.skipped, o.record = True, json.loads(o.path.read_text())
            say(f"{what}: skipped, result exists: {o.path}")
            continue
        if o.error is None:
            t0 = time.perf_counter()
            try:
                o.record = _compute(o, models, load, opts, catch)
                if main:
                    write_json_atomic(o.path, o.record, indent=None)
            except catch as err:
                o.error = str(err)
            spent, done = spent + time.perf_counter() - t0, done + 1
        if o.error is not None:
            say(f"{what}: error: {o.error}")
            continue
        left = sum(1 for j in range(i + 1, len(outcomes)) if j in pending and outcomes[j].error is None)
        score = main_metric(o.task, o.record["metrics"])
        say(f"{what}: main metric {score:.4f} in {time.perf_counter() - t0:.1f} s"
            + (f"; {left} to go, about {_eta(spent / done * left)} left" if left else ""))
    return outcomes


def _compute(o: Outcome, models: dict[ModelRef, Any], load: Callable[[ModelRef], Any], opts: TaskOptions,
             catch: tuple[type[BaseException], ...]) -> dict[str, Any]:
    ref = o.entry.model
    if ref not in models:
        try:
            models[ref] = load(ref)
        except catch as err:
            models[ref] = err  # a model that does not load fails each of its entries, once loaded once
    model = models[ref]
    if isinstance(model, BaseException):
        raise BenchmarkError(f"model {ref.label}: {model}")
    if o.task == "captioning" and not has_decoder(model):
        raise BenchmarkError(f"model {ref.label} has no captioning decoder: the captioning task needs a CoCa model")
    with eval_mode(model):
        metrics = TASK_FUNCTIONS[o.task](model, o.dataset, opts)
    return result_record(o.dataset, ref, o.task, metrics)


# -- summary -------------------------------------------------------------------------------------
def summary_rows(outcomes: Iterable[Outcome]) -> list[dict[str, Any]]:
    """A row per finished (model, dataset, task), then per model its average of the main metrics."""
    rows, by_model = [], {}
    for o in outcomes:
        if o.record is None:
            continue
        r = o.record
        main = main_metric(r["task"], r["metrics"])
        rows.append({"model": r["model"], "pretrained": r["pretrained"], "dataset": r["dataset"], "task": r["task"],
                     "main_metric": main, **r["metrics"]})
        by_model.setdefault((r["model"], r["pretrained"]), []).append(main)
    for (model, pretrained), mains in by_model.items():
        rows.append({"model": model, "pretrained": pretrained, "dataset": "average",
                     "task": f"mean of {len(mains)}", "main_metric": sum(mains) / len(mains)})
    return rows


COLUMNS = ("model", "pretrained", "dataset", "task", "main_metric")


def write_summary(outcomes: Iterable[Outcome], output: str | Path) -> tuple[Path, Path]:
    """``results.csv`` (all digits) and ``results.md`` (a table, 4 digits) in ``output``: the columns of
    :data:`COLUMNS`, then every metric of the tasks run, in the order they first appear."""
    rows, output = summary_rows(outcomes), Path(output)
    columns = list(COLUMNS) + list(dict.fromkeys(k for r in rows for k in r if k not in COLUMNS))

    def write_csv(f):
        w = csv.DictWriter(f, columns, restval="")
        w.writeheader()
        w.writerows(rows)

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else re.sub(r"([|])", r"\\\1", str(v))

    md = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    csv_path = atomic_write(output / "results.csv", write_csv)
    md_path = atomic_write(output / "results.md", lambda f: f.write("\n".join(md) + "\n"))
    return csv_path, md_path
