"""``mm zeroshot`` (zero-shot classification of images, folders or shards), ``mm eval`` (a run's evaluation on
shard sets) and ``mm probe`` (linear probes), over :mod:`mm.eval`.

Inputs, class names, templates and the output path are all checked before the model is loaded, so a typo
costs a second, not a model load. Shards are read by the evaluator's pipeline (:mod:`mm.eval.runner`), so
``mm eval`` reports exactly what a run's ``metrics.jsonl`` would.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from ..data.wds import check_urls, is_shard_spec
from ..eval.classify import (
    accuracy_table,
    folder_batches,
    label_images,
    prediction_line,
    resolve_shards,
    shard_batches,
    write_predictions,
    zeroshot,
)
from ..eval.config import EvalConfig, RetrievalConfig, ShardReading, ZeroShotConfig
from ..eval.probe import (
    DEFAULT_WEIGHT_DECAYS,
    image_features,
    labelled_batches,
    linear_probe,
    shard_classes,
)
from ..eval.runner import evaluate
from ..hub import load_model
from ..utils.host import default_workers
from ..utils.precision import PRECISIONS, autocast_dtype
from .common import (
    CLASSES_ARG,
    EXAMPLES,
    MODEL_ARGS,
    MODEL_ERRORS,
    add_model_and_labelled_shards,
    add_model_options,
    add_seq_len,
    check_out,
    check_seq_len,
    default_device,
    guard,
    parse_classes,
    parse_templates,
)


def _check_counts(args: argparse.Namespace) -> None:
    for name in ("batch_size", "max_samples", "k"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = "-k" if name == "k" else "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be >= 1, got {value}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")


@guard(FileNotFoundError, ValueError, *MODEL_ERRORS)  # bad inputs: one line naming the problem, exit 2
def cmd_zeroshot(args: argparse.Namespace) -> int:
    _check_counts(args)
    out = check_out(args.out, (".csv", ".json"))
    classnames, templates = parse_classes(args.classes), parse_templates(args.templates)
    label_key = None if args.label_key.lower() == "none" else args.label_key
    shards = [s for s in args.inputs if is_shard_spec(s)]
    if shards and len(shards) != len(args.inputs):
        raise ValueError("give image files and folders, or shards, not both in one call")
    if shards:
        urls, classnames, templates = resolve_shards(shards, classnames, templates, "shards", names=CLASSES_ARG)
    else:
        classnames, items = label_images(args.inputs, classnames, names=CLASSES_ARG)
    model = load_model(args.model, args.pretrained, default_device(args.device), adapter=args.adapter,
                       names=MODEL_ARGS)
    seq_len = check_seq_len(model, args.seq_len)
    if args.datastore:
        from ..inference import reco
        from ..inference.embed import EmbedError

        try:
            model = reco.load(args.datastore, model, args.allow_other_model)
        except EmbedError as e:
            raise ValueError(str(e)) from None
    batches = shard_batches(model, urls, label_key, args.batch_size, args.workers, seq_len) if shards \
        else folder_batches(model, items, args.batch_size, args.workers, seq_len)
    result = zeroshot(model, classnames, templates, batches, args.k, autocast_dtype=autocast_dtype(args.precision),
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


@guard(FileNotFoundError, ValueError, *MODEL_ERRORS)
def cmd_eval(args: argparse.Namespace) -> int:
    if not (args.zeroshot or args.retrieval):
        raise ValueError("nothing to evaluate: give --zeroshot SHARDS and/or --retrieval SHARDS")
    _check_counts(args)
    out = check_out(args.out, (".json",))
    zs, rt = ZeroShotConfig(), RetrievalConfig()
    if args.zeroshot:
        _, classnames, templates = resolve_shards(args.zeroshot, parse_classes(args.classes),
                                                  parse_templates(args.templates), "--zeroshot",
                                                  names=CLASSES_ARG)
        zs = ZeroShotConfig(shards=args.zeroshot, classnames=classnames, templates=templates,
                            label_key=args.label_key, max_samples=args.max_samples)
    if args.retrieval:
        check_urls(args.retrieval, "--retrieval")
        rt = RetrievalConfig(shards=args.retrieval, max_samples=args.max_samples)
    model = load_model(args.model, args.pretrained, default_device(args.device), adapter=args.adapter,
                       names=MODEL_ARGS)
    cfg = EvalConfig(batch_size=args.batch_size, zeroshot=zs, retrieval=rt)
    results = evaluate(cfg, model, next(model.parameters()).device, precision=args.precision,
                       reading=ShardReading(workers=args.workers, seq_len=check_seq_len(model, args.seq_len)))
    text = json.dumps(results, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
    return 0


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
    add_model_options(p)
    p.add_argument("--classes", help="class names: a .txt (one per line) or .json file, or a,b,c (default: the "
                                     "shards' info.json; mm zeroshot: also a folder's class sub-folders)")
    p.add_argument("--templates", help="prompt templates: a .txt / .json file, or one template such as "
                                       "'a photo of a {}.' (default: the shards' info.json, else OpenAI's)")
    p.add_argument("--label-key", default="cls", help="shards: the member holding the class index (default: cls; "
                                                      "mm zeroshot: none for unlabelled shards)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="image loading processes (0: load in this one; default: the available cores but one, 1 to 4)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast while encoding (default: fp32, none)")
    add_seq_len(p)


def add_zeroshot_and_eval_parsers(sub: Any) -> None:
    fmt = EXAMPLES
    p = sub.add_parser("zeroshot", help="zero-shot classify images, folders or shards",
                       description=ZEROSHOT_DESCRIPTION, formatter_class=fmt)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders or webdataset shards")
    _common(p, batch_size=64)
    p.add_argument("-k", type=int, default=5, help="predictions per image (default: 5)")
    p.add_argument("--out", help="write predictions to FILE.csv or FILE.json instead of printing them")
    p.add_argument("--datastore", metavar="DIR", help="retrieval-augmented (RECO): fuse image and class-prompt "
                   "embeddings with the neighbours of an `mm reco` datastore")
    p.add_argument("--allow-other-model", action="store_true", help="--datastore made with another model")
    p.set_defaults(fn=cmd_zeroshot)
    p = sub.add_parser("eval", help="zero-shot accuracy and retrieval recall on shards",
                       description=EVAL_DESCRIPTION, formatter_class=fmt)
    _common(p, batch_size=256)
    p.add_argument("--zeroshot", metavar="SHARDS", help="labelled shards (brace ranges, :: joins sets)")
    p.add_argument("--retrieval", metavar="SHARDS", help="captioned shards")
    p.add_argument("--max-samples", type=int, default=None, help="evaluate at most N samples of each set")
    p.add_argument("--out", help="also write the results to FILE.json")
    p.set_defaults(fn=cmd_eval)


PROBE_DESCRIPTION = """\
Linear probe: a multinomial logistic regression on the model's L2-normalised image embeddings of labelled
shards (label in --label-key, default cls). The weight decay is chosen from --weight-decays on a validation
split of --train (--val-fraction, seeded), the probe refitted on all of --train and scored on --test.
Prints top-1 / top-5; --json prints the result as one JSON object.

examples:
  mm probe --model runs/builtin/final --train 'data/builtin/train-{000000..000003}.tar.gz' \\
      --test data/builtin/test-000000.tar.gz
  mm probe --model runs/flickr8k_coca/final --train ../shared/datasets/cifar10/train-0000.tar.gz \\
      --test ../shared/datasets/cifar10/test-0000.tar.gz --max-train 5000 --max-test 2000 --json"""


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


@guard(FileNotFoundError, ValueError, *MODEL_ERRORS)
def cmd_probe(args: argparse.Namespace) -> int:
    for flag in ("batch_size", "max_train", "max_test", "max_iter"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if not 0 < args.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if not args.weight_decays or any(w < 0 for w in args.weight_decays):
        raise ValueError("--weight-decays must list values >= 0")
    train_urls, test_urls = check_urls(args.train, "--train"), check_urls(args.test, "--test")
    classes = shard_classes(train_urls, parse_classes(args.classes))
    if args.out and not Path(args.out).resolve().parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: folder {Path(args.out).parent} does not exist")
    device = default_device(args.device)
    model = load_model(args.model, args.pretrained, device, adapter=args.adapter, names=MODEL_ARGS)
    t0, skipped = time.time(), []
    feats = {}
    for name, urls, cap in (("train", train_urls, args.max_train), ("test", test_urls, args.max_test)):
        batches = labelled_batches(model, urls, label_key=args.label_key, batch_size=args.batch_size,
                                   workers=args.workers, max_samples=cap, skipped=skipped)
        feats[name] = image_features(model, batches, device=device, autocast_dtype=autocast_dtype(args.precision))
    t1 = time.time()
    r = linear_probe(*feats["train"], *feats["test"], len(classes) if classes else None,
                     weight_decays=args.weight_decays, val_fraction=args.val_fraction, seed=args.seed,
                     max_iter=args.max_iter)
    for s in skipped:
        print(f"skipped {s}", file=sys.stderr)
    result = {k: v for k, v in r.items() if k not in ("W", "b")}
    result.update(model=args.model, adapter=args.adapter, train=args.train, test=args.test, classes=classes,
                  skipped=len(skipped), encode_s=round(t1 - t0, 2), fit_s=round(time.time() - t1, 2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        for v in result["val"]:
            print(f"weight decay {v['weight_decay']:.0e}: validation top-1 {100 * v['top1']:.2f}%")
        print(f"linear probe: top-1 {100 * result['probe_top1']:.2f}%  top-5 {100 * result['probe_top5']:.2f}%  "
              f"(weight decay {result['weight_decay']:.0e}; {result['n_train']} train, {result['n_test']} test)")
    return 0


def add_probe_parser(sub: Any) -> None:
    p = sub.add_parser("probe", help="linear-probe accuracy of a model's image embeddings on labelled shards",
                       description=PROBE_DESCRIPTION, formatter_class=EXAMPLES)
    add_model_and_labelled_shards(p)
    p.add_argument("--max-train", type=int, default=None, help="use the first N training samples")
    p.add_argument("--max-test", type=int, default=None, help="use the first N test samples")
    p.add_argument("--classes", help="class names (a .txt / .json file or a,b,c; default: the shards' info.json); "
                                     "their number fixes the number of outputs")
    p.add_argument("--label-key", default="cls", help="the member holding the class index (default: cls)")
    p.add_argument("--weight-decays", type=_floats, default=list(DEFAULT_WEIGHT_DECAYS),
                   help="comma-separated L2 strengths to choose from (default: 1e-8,1e-7,...,1)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of --train held out to choose the weight "
                                                                    "decay (default: 0.2)")
    p.add_argument("--max-iter", type=int, default=1000, help="L-BFGS iterations per fit (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="image loading processes (0: load in this one; default: the available cores but one, 1 to 4)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast while encoding")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--out", help="also write the result to FILE.json")
    p.set_defaults(fn=cmd_probe)
