"""``mm zeroshot`` and ``mm eval``: zero-shot classification of images, folders or shards with any model
``--model`` names, and the training run's evaluation (zero-shot accuracy, retrieval recall) on shard sets.

Labels come from the inputs themselves: a folder whose immediate sub-folders are named after the classes
(``photos/cat/``, ``photos/golden_retriever/``), or shards whose samples hold a class index (``cls``).
Inputs, class names, templates and the output path are all checked before the model is loaded, so a typo
costs a second, not a model load. Shards are read by the training evaluator's pipeline
(``mm.train.evaluate``), so ``mm eval`` reports exactly what a run's ``metrics.jsonl`` would.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ..data.decode import BadSample
from ..data.folder import IMAGE_SUFFIXES, list_images, load_image
from ..data.transforms import image_transform
from ..data.wds import check_urls, expand_urls, is_local
from ..pretrained import PretrainedError, load_model
from ..tokenizer import get_tokenizer
from ..train.config import DataConfig, EvalConfig, RetrievalConfig, RunConfig, TrainConfig, ZeroShotConfig
from ..train.evaluate import eval_batches, evaluate, shard_info
from .zeroshot import Template, load_names, predict, zero_shot_classifier

_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def label_images(inputs: Sequence[str | Path], classnames: Sequence[str] | None = None,
                 ) -> tuple[list[str], list[tuple[Path, int | None]]]:
    """The class names and the images of ``inputs`` with their labels (``None`` = unknown).

    A folder with sub-folders is a class folder: each immediate sub-folder holds one class's images
    (searched recursively); images lying directly in it are unlabelled. With ``classnames`` every
    sub-folder must name one of them; without, the sub-folder names (``_`` read as a space) become the
    classes. Image files and folders without sub-folders are unlabelled. Raises FileNotFoundError /
    ValueError naming the problem: a missing path, a sub-folder that is no class, no classes at all.
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
        raise ValueError("no class names: give --classes (a file, or a,b,c), or a folder whose sub-folders are "
                         "named after the classes")
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
    return Batch(torch.stack([it[2] for it in good]) if good else None, [it[0] for it in good],
                 [it[1] for it in good], [f"{it[0]}: {it[3]}" for it in items if it[2] is None])


def folder_batches(model: Any, items: Sequence[tuple[Path, int | None]], batch_size: int = 64,
                   workers: int = 0) -> DataLoader:
    """Batches of ``items`` (from :func:`label_images`) in the model's eval preprocessing."""
    return DataLoader(_ImageFiles(items, image_transform(model, train=False)), batch_size=batch_size,
                      num_workers=workers, collate_fn=_collate)


def zeroshot_folder(model: Any, inputs: Sequence[str | Path], classnames: Sequence[str] | None = None,
                    templates: Sequence[Template] | None = None, k: int = 5, *, batch_size: int = 64,
                    workers: int = 0) -> ZeroShotResult:
    """``mm zeroshot`` on image files and folders (see :func:`label_images` for how labels are read)."""
    classnames, items = label_images(inputs, classnames)
    return zeroshot(model, classnames, templates, folder_batches(model, items, batch_size, workers), k)


# -- shards --------------------------------------------------------------------------------------
def is_shards(spec: str) -> bool:
    """Tar shards (brace ranges, ``::`` lists, ``pipe:`` and URLs included) rather than an image or folder."""
    return all(not is_local(u) or u.lower().endswith(_SHARD_SUFFIXES) for u in expand_urls(spec))


def resolve_shards(spec: str | list[str], classnames: Sequence[str] | None, templates: Sequence[Template] | None,
                   what: str) -> tuple[list[str], list[str], Sequence[Template] | None]:
    """Shard URLs (local files checked), class names and templates, the last two defaulting to the
    ``info.json`` beside the shards (templates then to OpenAI's)."""
    urls = check_urls(spec, what)
    info = shard_info(urls)
    if classnames is None:
        if not info.get("classes"):
            raise ValueError(f"{what}: no class names: give --classes, or put \"classes\" into the info.json beside "
                             f"the shards ({urls[0]})")
        classnames = load_names(info["classes"], "classnames")
    if templates is None and info.get("templates"):
        templates = load_names(info["templates"], "templates")
    return urls, list(classnames), templates


def _run_config(batch_size: int, workers: int, precision: str = "fp32", zeroshot: ZeroShotConfig | None = None,
                retrieval: RetrievalConfig | None = None) -> RunConfig:
    # The training evaluator reads its settings from a RunConfig; only data.*, train.precision and eval.*
    # are used (the model is passed separately), so a default RunConfig with these set is all it needs.
    return RunConfig(data=DataConfig(workers=workers), train=TrainConfig(precision=precision),
                     eval=EvalConfig(batch_size=batch_size, zeroshot=zeroshot or ZeroShotConfig(),
                                     retrieval=retrieval or RetrievalConfig()))


def shard_batches(model: Any, urls: list[str], label_key: str | None = "cls", batch_size: int = 64,
                  workers: int = 0) -> Iterator[Batch]:
    """Batches of the shards' samples (``label_key=None``: unlabelled); skipped samples are named by
    ``shard:key: reason``, cut-off shards by a warning."""
    cfg = _run_config(batch_size, workers)
    notes: list[str] = []
    for b in eval_batches(cfg, model, urls, ("label",) if label_key else (), label_key or "cls",
                          on_meta=lambda m: notes.extend(m["warnings"] + m["bad"])):
        labels = b["labels"].tolist() if label_key else [None] * len(b["keys"])
        yield Batch(b["images"], b["keys"], labels, notes[:])
        notes.clear()
    if notes:  # skipped after the last batch of images
        yield Batch(None, [], [], notes)


def zeroshot_shards(model: Any, shards: str | list[str], classnames: Sequence[str] | None = None,
                    templates: Sequence[Template] | None = None, k: int = 5, *, label_key: str | None = "cls",
                    batch_size: int = 64, workers: int = 0) -> ZeroShotResult:
    """``mm zeroshot`` on webdataset shards; class names and templates default to their info.json."""
    urls, classnames, templates = resolve_shards(shards, classnames, templates, "shards")
    return zeroshot(model, classnames, templates, shard_batches(model, urls, label_key, batch_size, workers), k)


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


# -- command line --------------------------------------------------------------------------------
def parse_classes(spec: str | None) -> list[str] | None:
    """``--classes``: a .txt / .json file, or names separated by commas."""
    if spec is None:
        return None
    if Path(spec).is_file():
        return load_names(spec, "classnames")
    if "," not in spec:
        raise FileNotFoundError(f"--classes {spec!r}: no such file (a list of names is comma-separated: a,b,c)")
    return load_names([c.strip() for c in spec.split(",")], "classnames")


def parse_templates(spec: str | None) -> list[str] | None:
    """``--templates``: a .txt / .json file, or one template with ``{}`` for the class name."""
    if spec is None:
        return None
    if Path(spec).is_file():
        return load_names(spec, "templates")
    if "{}" not in spec:
        raise FileNotFoundError(f"--templates {spec!r}: no such file (or give one template, with {{}} where the "
                                "class name goes)")
    return [spec]


def _check_out(out: str | None, suffixes: tuple[str, ...]) -> Path | None:
    if out is None:
        return None
    path = Path(out)
    if path.suffix.lower() not in suffixes:
        raise ValueError(f"--out {out}: must end in {' or '.join(suffixes)}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: folder {path.parent} does not exist")
    return path


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_samples", "k"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "-k" if name == "k" else "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")


def _load(args: argparse.Namespace) -> Any:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return load_model(args.model, args.pretrained, device)


def cmd_zeroshot(args: argparse.Namespace) -> int:
    _check_counts(args)
    out = _check_out(args.out, (".csv", ".json"))
    classnames, templates = parse_classes(args.classes), parse_templates(args.templates)
    label_key = None if args.label_key.lower() == "none" else args.label_key
    shards = [s for s in args.inputs if is_shards(s)]
    if shards and len(shards) != len(args.inputs):
        raise ValueError("give image files and folders, or shards, not both in one call")
    if shards:
        urls, classnames, templates = resolve_shards(shards, classnames, templates, "shards")
    else:
        classnames, items = label_images(args.inputs, classnames)
    model = _load(args)
    batches = shard_batches(model, urls, label_key, args.batch_size, args.workers) if shards \
        else folder_batches(model, items, args.batch_size, args.workers)
    result = zeroshot(model, classnames, templates, batches, args.k, autocast_dtype=_AUTOCAST[args.precision],
                      on_prediction=None if out else lambda p: print(prediction_line(p, classnames), flush=True),
                      on_skip=lambda s: print(f"skipped {s}", file=sys.stderr, flush=True))
    if out:
        write_predictions(result, out)
    if result.skipped:
        print(f"{len(result.skipped)} skipped, named above", file=sys.stderr)
    if not result.predictions:
        print("error: no usable image: every one was skipped", file=sys.stderr)
        return 1
    if result.accuracy is not None:
        print(accuracy_table(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if not (args.zeroshot or args.retrieval):
        raise ValueError("nothing to evaluate: give --zeroshot SHARDS and/or --retrieval SHARDS")
    _check_counts(args)
    out = _check_out(args.out, (".json",))
    zs, rt = ZeroShotConfig(), RetrievalConfig()
    if args.zeroshot:
        _, classnames, templates = resolve_shards(args.zeroshot, parse_classes(args.classes),
                                                  parse_templates(args.templates), "--zeroshot")
        zs = ZeroShotConfig(shards=args.zeroshot, classnames=classnames, templates=templates,
                            label_key=args.label_key, max_samples=args.max_samples)
    if args.retrieval:
        check_urls(args.retrieval, "--retrieval")
        rt = RetrievalConfig(shards=args.retrieval, max_samples=args.max_samples)
    model = _load(args)
    cfg = _run_config(args.batch_size, args.workers, args.precision, zs, rt)
    results = evaluate(cfg, model, next(model.parameters()).device)
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
    return 0


def add_model_and_labelled_shards(p: argparse.ArgumentParser) -> None:
    """The options ``mm probe`` and ``mm finetune`` share: the model and the labelled train / test shards."""
    from ..cli import MODEL_HELP

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--pretrained", help="weights file for a preset --model (mm or open_clip checkpoint)")
    p.add_argument("--train", required=True, metavar="SHARDS", help="labelled training shards (brace ranges, :: joins)")
    p.add_argument("--test", required=True, metavar="SHARDS", help="labelled test shards")


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    # Bad inputs are user errors: one line naming the problem and exit code 2, not a traceback.
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (FileNotFoundError, ValueError, PretrainedError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    return run


ZEROSHOT_DESCRIPTION = """\
Zero-shot classification: each image's top-k classes with probabilities, one line per image
(PATH<TAB>class prob<TAB>...), or a CSV / JSON file with --out. INPUTs are image files, folders (searched
recursively) or webdataset shards. Known labels add top-1 / top-5 accuracy and a per-class table:
  - a folder whose sub-folders are named after the classes (photos/cat/, photos/golden_retriever/): matched
    to --classes ignoring case, with _ and - read as spaces; without --classes the sub-folders are the classes;
  - shards whose samples hold a class index (--label-key); classes and templates default to their info.json.
Unreadable images are skipped, named and counted. Templates default to OpenAI's 80 ImageNet prompts.

examples:
  mm zeroshot --model runs/builtin/final data/builtin/test-000000.tar.gz
  mm zeroshot --model open_clip:ViT-B-32:openai --classes cat,dog,bird photos/
  mm zeroshot --model ViT-B-32 --pretrained b32.safetensors --classes classes.txt --templates prompts.txt \\
      -k 3 --out predictions.csv imagenet_val/"""

EVAL_DESCRIPTION = """\
Evaluate a model on shard sets as training does: zero-shot top-1 / top-5 on labelled shards, image <-> text
recall@1/5/10 on captioned shards (all json "captions" of a sample, else its text). Prints the results as
JSON (the keys of a run's metrics.jsonl).

examples:
  mm eval --model runs/builtin/final --zeroshot 'data/builtin/test-{000000..000001}.tar.gz'
  mm eval --model open_clip:ViT-B-32:openai --zeroshot cifar10/test-0000.tar.gz \\
      --retrieval flickr8k/test-0000.tar --max-samples 1000 --out results.json"""


def _common(p: argparse.ArgumentParser, batch_size: int) -> None:
    from ..cli import MODEL_HELP

    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--pretrained", help="weights file for a preset --model (mm or open_clip checkpoint)")
    p.add_argument("--classes", help="class names: a .txt (one per line) or .json file, or a,b,c (default: the "
                                     "shards' info.json; mm zeroshot: also a folder's class sub-folders)")
    p.add_argument("--templates", help="prompt templates: a .txt / .json file, or one template such as "
                                       "'a photo of a {}.' (default: the shards' info.json, else OpenAI's)")
    p.add_argument("--label-key", default="cls", help="shards: the member holding the class index (default: cls; "
                                                      "mm zeroshot: none for unlabelled shards)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", type=int, default=2, help="image loading processes (0: load in this one)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", default="fp32", choices=list(_AUTOCAST), help="autocast while encoding (default: fp32, none)")


def add_parsers(sub: Any) -> None:
    """Add ``mm zeroshot`` and ``mm eval`` to the ``mm`` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("zeroshot", help="zero-shot classify images, folders or shards",
                       description=ZEROSHOT_DESCRIPTION, formatter_class=fmt)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or webdataset shards")
    _common(p, batch_size=64)
    p.add_argument("-k", type=int, default=5, help="predictions per image (default: 5)")
    p.add_argument("--out", help="write predictions to FILE.csv or FILE.json instead of printing them")
    p.set_defaults(fn=_guard(cmd_zeroshot))
    p = sub.add_parser("eval", help="zero-shot accuracy and retrieval recall on shards",
                       description=EVAL_DESCRIPTION, formatter_class=fmt)
    _common(p, batch_size=256)
    p.add_argument("--zeroshot", metavar="SHARDS", help="labelled shards (brace ranges, :: joins sets)")
    p.add_argument("--retrieval", metavar="SHARDS", help="captioned shards")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate at most N samples of each set")
    p.add_argument("--out", help="also write the results to FILE.json")
    p.set_defaults(fn=_guard(cmd_eval))
