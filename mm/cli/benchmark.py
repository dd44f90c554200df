"""``mm benchmark``: clip_benchmark's evaluations (zero-shot classification and retrieval, linear probe, captioning,
image-caption selection) on webdataset / image-folder datasets, for any ``--model`` mm loads, over :mod:`mm.eval.benchmark` (which says what is measured and how files are named).

Datasets and suites are checked before any model loads; each (dataset, model, task) writes its result as soon as
it is done and is skipped when its result exists, so an interrupted suite resumes where it stopped.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..eval.benchmark import (TASKS, BenchmarkError, ModelRef, Suite, TaskOptions, check_task, entries, load_suite,
                              run_benchmark, write_summary)
from ..inference.generate import GenerationConfig
from ..hub import load_model
from ..utils import dist
from ..utils.host import default_workers
from ..utils.precision import PRECISIONS, autocast_dtype
from .common import EXAMPLES, MODEL_ARGS, MODEL_ERRORS, default_device, guard

DESCRIPTION = """\
LAION clip_benchmark's evaluations, run by mm on any model it loads, with clip_benchmark's definitions:
zero-shot classification (acc1, acc5, mean_per_class_recall), image <-> text retrieval
(image_retrieval_recall@1/5/10, text_retrieval_recall@1/5/10), linear probe (lp_acc1, lp_acc5,
lp_mean_per_class_recall: a linear classifier trained by AdamW on --train-split features, the weight decay searched
on --val-split or a --val-proportion of it), captioning (Bleu_1..4, ROUGE_L, CIDEr; CoCa models) and
image-caption selection (acc: the first of a sample's captions is the most similar; SugarCrepe-style sets). Datasets are in clip_benchmark's webdataset
layout (DIR/{split}/*.tar, classnames.txt, zeroshot_classification_templates.txt, dataset_type.txt) or image
folders with a sub-folder per class; --dataset wds/NAME reads --dataset-root/NAME (or --dataset-root
'.../{dataset}', as clip_benchmark's --dataset_root). A dataset or dataset root may be an http(s) URL, as
clip_benchmark's own (https://huggingface.co/datasets/clip-benchmark/wds_{dataset_cleaned}/tree/main): its shards
stream, {split}/nshards.txt counts them. Each (dataset, model, task) is written to --output as
clip_benchmark's DATASET_PRETRAINED_MODEL_en_TASK.json (clip_benchmark build reads them with its own) and skipped
when that file exists (--overwrite recomputes); results.csv and results.md tabulate them with each model's average
of one main metric per task (acc1, mean recall@1, lp_acc1, CIDEr, acc). A failing entry is reported and the others still run;
the exit code is then 2. The task defaults to the dataset's own, as clip_benchmark's --task auto
(dataset_type.txt: retrieval; sugar_crepe* / winoground: image_caption_selection; else classification).

A --suite YAML lists datasets (with tasks) and optionally models:
  dataset_root: /data/clip_benchmark_wds
  models: [open_clip:ViT-B-32:openai, {model: ViT-B-32, pretrained: b32.safetensors}]
  datasets: [wds/cifar10, {dataset: wds/flickr8k, tasks: [zeroshot_retrieval]}]

examples:
  mm benchmark --model open_clip:ViT-B-32:openai --dataset wds/cifar10 --dataset-root /data/wds --output results/
  mm benchmark --model runs/builtin/final --model ViT-B-32 --dataset flickr8k_wds/ --task zeroshot_retrieval
  mm benchmark --suite suite.yaml --model runs/flickr8k_coca/final --output results/ --batch-size 128
  mm benchmark --model open_clip:ViT-B-32:openai --dataset wds/cifar10 --dataset-root /data/wds \
      --task linear_probe --val-proportion 0.2
  accelerate launch --multi_gpu --num_processes 8 -m mm.cli benchmark --suite suite.yaml --model M

Under `accelerate launch` every process encodes its share of each split's shards (or image files); the main process
writes the results."""


def _models(args: argparse.Namespace, suite: Suite | None) -> list[ModelRef]:
    if args.model:
        if len(args.model) > 1 and (args.pretrained or args.adapter):
            raise ValueError("--pretrained / --adapter go with a single --model; list several models with their "
                             "weights in a --suite file ({model: M, pretrained: FILE})")
        return [ModelRef(m, args.pretrained, args.adapter) for m in args.model]
    if suite and suite.models:
        return suite.models
    raise ValueError("no model: give --model (or list models in the --suite file)")


@guard(BenchmarkError, FileNotFoundError, ValueError, *MODEL_ERRORS)
def cmd_benchmark(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    suite = load_suite(args.suite, "--suite") if args.suite else None
    if not (args.dataset or suite):
        raise ValueError("no dataset: give --dataset (or a --suite file)")
    if args.dataset and suite:
        raise ValueError("give --dataset or --suite, not both")
    for t in args.task or []:
        check_task(t)
    datasets = suite.datasets if suite else [(d, args.task or None) for d in args.dataset]
    if suite and args.task:
        datasets = [(d, args.task) for d, _ in datasets]
    if args.val_split and args.val_proportion is not None:
        raise ValueError("give --val-split or --val-proportion, not both")
    if args.val_proportion is not None and not 0 < args.val_proportion < 1:
        raise ValueError(f"--val-proportion must be in (0, 1), got {args.val_proportion}")
    if args.fewshot_epochs < 1 or args.fewshot_lr <= 0:
        raise ValueError("--fewshot-epochs must be >= 1 and --fewshot-lr > 0")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    options = TaskOptions(train_split=args.train_split, val_split=args.val_split, val_proportion=args.val_proportion,
                          fewshot_k=args.fewshot_k, fewshot_lr=args.fewshot_lr, fewshot_epochs=args.fewshot_epochs,
                          seed=args.seed, generation=GenerationConfig(method=args.generation,
                                                                      num_beams=args.num_beams,
                                                                      max_new_tokens=args.max_new_tokens))
    started = dist.start()  # forms the process group under `accelerate launch`
    device = args.device or (str(started) if dist.is_dist() else default_device(None))
    outcomes = run_benchmark(
        entries(_models(args, suite), datasets),
        lambda ref: load_model(ref.spec, ref.pretrained, device, adapter=ref.adapter, names=MODEL_ARGS), args.output,
        dataset_root=args.dataset_root or (suite.dataset_root if suite else None), split=args.split,
        batch_size=args.batch_size, workers=args.workers, autocast_dtype=autocast_dtype(args.precision),
        options=options, overwrite=args.overwrite, errors=MODEL_ERRORS, log=lambda line: print(line, flush=True))
    if not dist.is_main():
        return 2 if any(o.error is not None for o in outcomes) else 0
    csv_path, md_path = write_summary(outcomes, args.output)
    failed = [o for o in outcomes if o.error is not None]
    print(f"{len(outcomes) - len(failed)} of {len(outcomes)} results in {args.output} (tables: {csv_path}, {md_path})")
    if len(outcomes) == 1 and failed:
        print(f"error: {failed[0].error}", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} entries failed:", file=sys.stderr)
        for o in failed:
            print(f"  {o.entry.dataset} {o.task or o.entry.task or ''} {o.entry.model.label}: {o.error}",
                  file=sys.stderr)
        return 2
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("benchmark", help="clip_benchmark's evaluation suite on any model, in files it merges",
                       description=DESCRIPTION, formatter_class=EXAMPLES)
    p.add_argument("--model", action="append", help="a model as every command takes it (repeat for several): an mm "
                                                    "model directory, open_clip:NAME[:TAG], a preset with --pretrained")
    p.add_argument("--pretrained", help="weights file for a preset --model (mm or open_clip checkpoint)")
    p.add_argument("--adapter", metavar="DIR", help="a LoRA adapter directory put on --model")
    p.add_argument("--dataset", nargs="+", action="extend", metavar="NAME|wds/NAME|DIR",
                   help="datasets: wds/NAME or NAME under --dataset-root, or a directory, or a URL")
    p.add_argument("--task", nargs="+", action="extend", metavar="TASK",
                   help=f"{' and/or '.join(TASKS)} (default: each dataset's own, from its dataset_type.txt)")
    p.add_argument("--dataset-root", metavar="DIR", help="where wds/NAME is: DIR/NAME, or a template with {dataset}; "
                   "DIR may be an http(s) URL")
    p.add_argument("--suite", metavar="FILE", help="a YAML of datasets x tasks (and models) to run, resumably")
    p.add_argument("--output", default="benchmark", metavar="DIR",
                   help="result files and results.csv / results.md (default: benchmark)")
    p.add_argument("--overwrite", action="store_true", help="recompute results whose file exists")
    p.add_argument("--split", default="test", help="the dataset split, a sub-folder of each dataset (default: test)")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (default: 64, clip_benchmark's)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="image loading processes (0: load in this one; default: the available cores but one, 1 to 4)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    probe = p.add_argument_group("linear_probe (clip_benchmark's options and defaults)")
    probe.add_argument("--train-split", default="train", help="the split the probe trains on (default: train)")
    probe.add_argument("--val-split", help="a split for the weight-decay search (default: none, weight decay 0)")
    probe.add_argument("--val-proportion", type=float,
                       help="hold out this share of --train-split for the weight-decay search, then train on all")
    probe.add_argument("--fewshot-k", type=int, default=-1, help="training samples per class (-1: all; default)")
    probe.add_argument("--fewshot-epochs", type=int, default=10, help="epochs (default: 10)")
    probe.add_argument("--fewshot-lr", type=float, default=0.1, help="AdamW learning rate (default: 0.1)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the probe's sampling and init (default: 0)")
    cap = p.add_argument_group("captioning")
    cap.add_argument("--generation", default="beam", choices=["beam", "greedy"],
                     help="decoding (default: beam)")
    cap.add_argument("--num-beams", type=int, default=6, help="beams (default: 6, as open_clip's CoCa.generate)")
    cap.add_argument("--max-new-tokens", type=int, help="caption length limit (default: the model's context)")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="autocast while encoding (default: fp32; clip_benchmark's default is autocast, --no_amp = fp32)")
    p.set_defaults(fn=cmd_benchmark)
