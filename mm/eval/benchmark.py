"""``mm benchmark``: LAION clip_benchmark's zero-shot evaluations (``clip_benchmark eval``) run by mm on any model
mm loads, writing result files that merge with clip_benchmark's own.

Datasets are clip_benchmark's webdataset layout (``clip_benchmark_export_wds``): a directory holding
``{split}/*.tar`` (``{split}/nshards.txt`` + ``0.tar .. n-1.tar`` as clip_benchmark reads them; without
nshards.txt every ``*.tar`` in numeric order), ``classnames.txt`` (line i = class i), ``zeroshot_classification_
templates.txt`` (``{c}`` marks the class name: ``str.format(c=...)``) and ``dataset_type.txt`` (``retrieval``,
else classification). Samples hold an image (``webp``, ``png``, ``jpg``, ``jpeg``: the first present, in that
order), ``cls`` (class index) or ``txt`` (captions, one per line). A torchvision-style image folder (class
sub-folders in sorted order, optionally under ``{split}/``; names from ``classnames.txt`` when there is one, else
the folder names) is a classification dataset too. Missing templates fall back to OpenAI's 80 ImageNet prompts.

Metrics, as clip_benchmark 1.6.2 defines them (``metrics/zeroshot_*.py``):

- ``acc1``, ``acc5``: top-k accuracy over all images; ``acc5`` is NaN with fewer than 5 classes (written as
  ``NaN``, which Python's json, and so clip_benchmark's ``build``, reads); ``mean_per_class_recall``: the mean
  over the classes that occur in the labels of each class's top-1 recall (sklearn's ``balanced_accuracy_score``).
- ``image_retrieval_recall@k`` (text -> image: a caption is a hit if its image is among its top k) and
  ``text_retrieval_recall@k`` (image -> text: an image is a hit if ANY of its captions is among its top k), k in
  1, 5, 10 (clip_benchmark's default is ``--recall_k 5`` only).

Result files: one per (dataset, model, task), named as clip_benchmark's default ``--output`` template
``{dataset}_{pretrained}_{model}_{language}_{task}.json`` with its fields (dataset, model, pretrained, task,
metrics, language ``en``), so ``clip_benchmark build`` reads them next to its own. A model is named as
clip_benchmark names it where there is an equivalent: ``open_clip:NAME:TAG`` -> (NAME, TAG); a preset or config
with ``--pretrained FILE`` -> (preset, FILE; the file's basename in the file name, as clip_benchmark does);
an mm model directory -> (its path, ""). ``/`` in names becomes ``_`` in file names.

The summary (``results.csv`` / ``results.md``) has a row per (model, dataset, task) and, per model, an average
of one main metric per task, as DataComp averages its 38 tasks: ``acc1`` for classification (not the mean
per-class recall: acc1 is what papers and clip_benchmark's tables lead with), the mean of image and text
recall@1 for retrieval (both directions count, and @1 is the least saturated).
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.folder import list_images
from ..hub.spec import parse_spec
from ..tokenizer import get_tokenizer
from ..utils.io import atomic_write, write_json_atomic
from ..utils.nn import eval_mode, model_device
from .classify import folder_batches
from .config import ShardReading
from .retrieval import retrieval_eval
from .runner import eval_batches
from .zeroshot import zero_shot_classifier, zero_shot_eval

TASKS = ("zeroshot_classification", "zeroshot_retrieval")
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
    """A resolved dataset: ``name`` as results record it, ``path`` its directory, ``kind`` ``wds`` / ``folder``."""

    name: str
    path: Path
    kind: str
    split: str
    dataset_type: str  # "classification" or "retrieval" (dataset_type.txt)

    @property
    def slug(self) -> str:
        return self.name.removeprefix("wds/").replace("/", "_")

    @property
    def default_task(self) -> str:
        return "zeroshot_retrieval" if self.dataset_type == "retrieval" else "zeroshot_classification"


def resolve_dataset(spec: str, root: str | None = None, split: str = "test") -> Dataset:
    """``wds/NAME`` (or ``NAME``) under ``root``, or a directory path. ``root`` may be a template as clip_benchmark's
    ``--dataset_root`` (``{dataset}``, ``{dataset_cleaned}``: the directory itself); a plain ``root`` holds
    ``NAME/``. A path that exists wins over a name."""
    if Path(spec).is_dir() and not spec.startswith("wds/"):
        path = Path(spec)
        is_wds = _split_shards(path, split) is not None
        name = f"wds/{path.resolve().name}" if is_wds else path.resolve().name
    else:
        short = spec.removeprefix("wds/")
        if root is None:
            raise BenchmarkError(f"dataset {spec!r}: no such directory, and no --dataset-root to find it under")
        if "{dataset" in root:
            path = Path(root.format(dataset=short, dataset_cleaned=short.replace("/", "-")))
        else:
            path = Path(root) / short
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


def _split_shards(path: Path, split: str) -> list[Path] | None:
    d = path / split
    if (d / "nshards.txt").is_file():
        return [d / f"{i}.tar" for i in range(int((d / "nshards.txt").read_text().strip()))]
    tars = sorted(d.glob("*.tar"), key=lambda p: (0, int(p.stem), "") if p.stem.isdigit() else (1, 0, p.stem))
    return tars or None


def shard_urls(ds: Dataset) -> list[str]:
    """The split's shards in clip_benchmark's order; a missing one is an error naming it."""
    paths = _split_shards(ds.path, ds.split) or []
    for p in paths:
        if not p.is_file():
            raise BenchmarkError(f"{ds.path}: shard {p} is missing ({ds.split}/nshards.txt lists {len(paths)})")
    return [str(p) for p in paths]


def _folder_root(path: Path, split: str) -> Path:
    return path / split if (path / split).is_dir() else path


def _class_dirs(path: Path) -> list[Path]:
    return sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name)


def classnames(ds: Dataset) -> list[str]:
    """``classnames.txt`` (line i = class i); an image folder without one: its class folders' names."""
    f = ds.path / "classnames.txt"
    if ds.kind == "folder" and not f.is_file():
        return [d.name.replace("_", " ") for d in _class_dirs(_folder_root(ds.path, ds.split))]
    if not f.is_file():
        raise BenchmarkError(f"{ds.path}: no classnames.txt (one class name per line, line i = class i), which "
                             "zero-shot classification needs")
    names = [line.strip() for line in f.read_text(encoding="utf-8").splitlines()]
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
    f = ds.path / "zeroshot_classification_templates.txt"
    if not f.is_file():
        return None
    lines = [line.strip() for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        for t in lines:
            t.format(c="x")
    except (KeyError, IndexError, ValueError) as e:
        raise BenchmarkError(f"{f}: template {t!r} is not a format string with {{c}} ({e!r})") from None
    return [lambda c, t=t: t.format(c=c) for t in lines] or None


# -- reading -------------------------------------------------------------------------------------
def _check_meta(ds: Dataset) -> Callable[[dict[str, Any]], None]:
    """A benchmark scores the whole set or nothing: a cut-off shard or an unusable sample is an error."""
    def check(meta: dict[str, Any]) -> None:
        if meta["warnings"]:
            raise BenchmarkError(f"{ds.name}: {meta['warnings'][0].split('; the rest of this shard')[0]}")
        if meta["bad"]:
            raise BenchmarkError(f"{ds.name}: unusable sample {meta['bad'][0]}")
    return check


def _shard_batches(model: Any, ds: Dataset, need: tuple[str, ...], batch_size: int,
                   workers: int) -> Iterator[dict[str, Any]]:
    return eval_batches(model, shard_urls(ds), need, batch_size=batch_size,
                        reading=ShardReading(workers=workers, image_keys=IMAGE_KEYS), on_meta=_check_meta(ds))


def _labelled(model: Any, ds: Dataset, n_classes: int, batch_size: int,
              workers: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches, every label checked against the number of classes."""
    if ds.kind == "wds":
        batches = ((b["images"], b["labels"], b["keys"]) for b in _shard_batches(model, ds, ("label",), batch_size,
                                                                                  workers))
    else:
        dirs = _class_dirs(_folder_root(ds.path, ds.split))
        if len(dirs) != n_classes:
            raise BenchmarkError(f"{ds.path}: classnames.txt lists {n_classes} classes but there are {len(dirs)} "
                                 "class folders")
        items = [(f, i) for i, d in enumerate(dirs) for f in list_images([d])]
        if not items:
            raise BenchmarkError(f"{ds.path}: no images in its class folders")
        batches = _folder_batches(model, items, batch_size, workers)
    for images, labels, keys in batches:
        labels = torch.as_tensor(labels)
        bad = ((labels < 0) | (labels >= n_classes)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise BenchmarkError(f"{ds.path}: sample {keys[i]} has label {int(labels[i])}, but classnames.txt lists "
                                 f"{n_classes} classes (labels 0..{n_classes - 1})")
        yield images, labels


def _folder_batches(model: Any, items: list[tuple[Path, int]], batch_size: int,
                    workers: int) -> Iterator[tuple[torch.Tensor, list[int], list[str]]]:
    for b in folder_batches(model, items, batch_size, workers):
        if b.skipped:
            raise BenchmarkError(f"unreadable image {b.skipped[0]}")
        yield b.images, b.labels, b.names


# -- tasks ---------------------------------------------------------------------------------------
def zeroshot_classification(model: Any, ds: Dataset, *, batch_size: int = 64, workers: int = 0,
                            autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """clip_benchmark's ``acc1``, ``acc5`` and ``mean_per_class_recall`` (see the module docstring)."""
    names = classnames(ds)
    W = zero_shot_classifier(model, get_tokenizer(model), names, templates(ds), device=model_device(model))
    r = zero_shot_eval(model, W, _labelled(model, ds, len(names), batch_size, workers), autocast_dtype=autocast_dtype)
    per_class = [c["top1"] for c in r["per_class"].values()]
    return {"acc1": r["zeroshot_top1"], "acc5": r["zeroshot_top5"] if len(names) >= 5 else math.nan,
            "mean_per_class_recall": sum(per_class) / len(per_class)}


def zeroshot_retrieval(model: Any, ds: Dataset, *, batch_size: int = 64, workers: int = 0,
                       autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """clip_benchmark's ``image_retrieval_recall@k`` / ``text_retrieval_recall@k``; a sample's ``txt`` holds its
    captions, one per line."""
    if ds.kind != "wds":
        raise BenchmarkError(f"{ds.path}: zeroshot_retrieval needs webdataset shards with captions (txt)")
    batches = ((b["images"], [t.splitlines() for t in b["texts"]])
               for b in _shard_batches(model, ds, ("text",), batch_size, workers))
    r = retrieval_eval(model, get_tokenizer(model), batches, ks=RECALL_KS, autocast_dtype=autocast_dtype)
    out = {f"image_retrieval_recall@{k}": r[f"t2i_r{k}"] for k in RECALL_KS}
    out.update({f"text_retrieval_recall@{k}": r[f"i2t_r{k}"] for k in RECALL_KS})
    return out


TASK_FUNCTIONS = {"zeroshot_classification": zeroshot_classification, "zeroshot_retrieval": zeroshot_retrieval}


def check_task(task: str) -> str:
    if task not in TASKS:
        raise BenchmarkError(f"unknown task {task!r} (mm benchmark runs: {', '.join(TASKS)})")
    return task


def main_metric(task: str, metrics: dict[str, float]) -> float:
    """The one number per task that the average takes (module docstring)."""
    if task == "zeroshot_classification":
        return metrics["acc1"]
    return (metrics["image_retrieval_recall@1"] + metrics["text_retrieval_recall@1"]) / 2


# -- models and result files ---------------------------------------------------------------------
@dataclass(frozen=True)
class ModelRef:
    """A ``--model`` with its ``--pretrained`` / ``--adapter``, and the (model, pretrained) names results record."""

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
        return " ".join(x for x in (self.spec, self.pretrained and f"--pretrained {self.pretrained}",
                                    self.adapter and f"--adapter {self.adapter}") if x)


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
    return [check_task(str(t)) for t in value]


def load_suite(path: str | Path) -> Suite:
    """A suite YAML::

        dataset_root: /data/wds            # optional (``--dataset-root`` overrides it)
        models: [open_clip:ViT-B-32:openai, {model: ViT-B-32, pretrained: b32.safetensors}]   # optional
        tasks: [zeroshot_classification]   # optional default for every dataset; else each dataset's own
        datasets:
          - wds/cifar10
          - {dataset: wds/flickr8k, tasks: [zeroshot_retrieval]}
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"--suite {path}: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise BenchmarkError(f"--suite {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("datasets"), list) or not data["datasets"]:
        raise BenchmarkError(f"--suite {path}: needs a non-empty 'datasets' list")
    unknown = set(data) - {"dataset_root", "models", "tasks", "datasets"}
    if unknown:
        raise BenchmarkError(f"--suite {path}: unknown key {sorted(unknown)[0]!r} (keys: dataset_root, models, "
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


def _plan(entry: Entry, root: str | None, split: str, output: Path) -> Outcome:
    ds = resolve_dataset(entry.dataset, root, split)
    task = check_task(entry.task) if entry.task else ds.default_task
    if task == "zeroshot_classification":
        classnames(ds)  # checked before any model loads
    if ds.kind == "wds":
        shard_urls(ds)
    return Outcome(entry, ds, task, output / result_name(ds, entry.model, task))


def _eta(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def run_benchmark(todo: Sequence[Entry], load: Callable[[ModelRef], Any], output: str | Path, *,
                  dataset_root: str | None = None, split: str = "test", batch_size: int = 64, workers: int = 0,
                  autocast_dtype: torch.dtype | None = None, overwrite: bool = False,
                  errors: tuple[type[BaseException], ...] = (), log: Callable[[str], None] = print) -> list[Outcome]:
    """Run every entry whose result file is not in ``output`` yet (all with ``overwrite``), writing each result as
    it is done (a killed run resumes where it stopped). ``load(ref)`` gives a model; ``errors`` (besides
    BenchmarkError / FileNotFoundError) are the ones a bad entry may raise: it is reported in its outcome and the
    others still run. Logs a line per entry with the time left, estimated from the entries computed so far."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    catch = (BenchmarkError, FileNotFoundError, *errors)
    outcomes = []
    for e in todo:  # datasets checked first: a typo costs no model load
        try:
            outcomes.append(_plan(e, dataset_root, split, output))
        except catch as err:
            outcomes.append(Outcome(e, error=str(err)))
    pending = {id(o) for o in outcomes if o.error is None and (overwrite or not o.path.is_file())}
    models: dict[ModelRef, Any] = {}
    spent, done = 0.0, 0
    for i, o in enumerate(outcomes, 1):
        what = f"[{i}/{len(outcomes)}] {o.entry.dataset} {o.task or o.entry.task or ''} {o.entry.model.label}"
        if o.error is None and id(o) not in pending:
            o.skipped, o.record = True, json.loads(o.path.read_text())
            log(f"{what}: skipped, result exists: {o.path}")
            continue
        if o.error is None:
            t0 = time.perf_counter()
            try:
                o.record = _compute(o, models, load, batch_size, workers, autocast_dtype, catch)
                write_json_atomic(o.path, o.record, indent=None)
            except catch as err:
                o.error = str(err)
            spent, done = spent + time.perf_counter() - t0, done + 1
        if o.error is not None:
            log(f"{what}: error: {o.error}")
            continue
        left = sum(1 for p in outcomes[i:] if id(p) in pending and p.error is None)
        main = main_metric(o.task, o.record["metrics"])
        log(f"{what}: main metric {main:.4f} in {time.perf_counter() - t0:.1f} s"
            + (f"; {left} to go, about {_eta(spent / done * left)} left" if left else ""))
    return outcomes


def _compute(o: Outcome, models: dict[ModelRef, Any], load: Callable[[ModelRef], Any], batch_size: int, workers: int,
             autocast_dtype: torch.dtype | None, catch: tuple[type[BaseException], ...]) -> dict[str, Any]:
    ref = o.entry.model
    if ref not in models:
        try:
            models[ref] = load(ref)
        except catch as err:
            models[ref] = err  # a model that does not load fails each of its entries, once loaded once
    model = models[ref]
    if isinstance(model, BaseException):
        raise BenchmarkError(f"model {ref.label}: {model}")
    with eval_mode(model):
        metrics = TASK_FUNCTIONS[o.task](model, o.dataset, batch_size=batch_size, workers=workers,
                                         autocast_dtype=autocast_dtype)
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


COLUMNS = ("model", "pretrained", "dataset", "task", "main_metric") + CLASSIFICATION_METRICS + RETRIEVAL_METRICS


def write_summary(outcomes: Iterable[Outcome], output: str | Path) -> tuple[Path, Path]:
    """``results.csv`` (all digits) and ``results.md`` (a table, 4 digits) in ``output``."""
    rows, output = summary_rows(outcomes), Path(output)

    def write_csv(f):
        w = csv.DictWriter(f, COLUMNS, restval="")
        w.writeheader()
        w.writerows(rows)

    def cell(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else re.sub(r"([|])", r"\\\1", str(v))

    md = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(cell(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    csv_path = atomic_write(output / "results.csv", write_csv)
    md_path = atomic_write(output / "results.md", lambda f: f.write("\n".join(md) + "\n"))
    return csv_path, md_path
