"""``mm finetune``: classification fine-tuning of a model's image tower from its zero-shot head, with WiSE-FT
(:mod:`mm.train.finetune`)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from ..config import validate
from ..data.wds import check_urls
from ..eval.classify import resolve_shards
from ..hub import is_adapter_dir
from ..hub.wrapped import WrappedModelError, native_only
from ..layers.config import LoraConfig
from ..train.config import not_native
from ..train.finetune import FinetuneConfig, run, run_config
from ..utils.precision import PRECISIONS
from .common import (
    EXAMPLES,
    MODEL_ERRORS,
    add_config_flags,
    add_model_and_labelled_shards,
    guard,
    parse_classes,
    parse_templates,
)

DESCRIPTION = """\
Fine-tune a model's image tower for classification on labelled shards (label in --label-key, classes from
--classes or the shards' info.json). The linear head starts as the zero-shot classifier (class names x
templates; --templates, default: info.json, else OpenAI's ImageNet prompts), so step 0 predicts exactly what
zero-shot classification does. After training, WiSE-FT: every trained tensor is interpolated,
(1 - alpha) * zero-shot + alpha * fine-tuned, and the test accuracy is printed for each --wise-alpha (0 = the
zero-shot model, 1 = the fine-tuned one). Writes OUT/finetuned/ (an mm model directory plus
classifier.safetensors and classes.json), OUT/wise-A/ with --save-alpha A, OUT/results.json, and what every mm
train run writes: OUT/config.yaml, OUT/metrics.jsonl, TensorBoard events, plots, OUT/checkpoints/step_N/.

It runs on mm train's trainer (the options below from --steps on are its settings): checkpoints every
--checkpoint-every steps, exact resume (--resume auto, the default, continues OUT's newest checkpoint), --precision
bf16, several processes under accelerate launch (DDP), and mm train's log records. SIGTERM / SIGINT stop it at the
next step with a checkpoint (exit 0); the same command then continues, bit for bit as if never stopped.

--lora: low-rank adapters on the image encoder (--lora-targets, default vision.attn) train with the head; the
base weights stay frozen (bit-identical, out of the optimizer). OUT/finetuned/ is then a LoRA adapter directory
(the adapters, the base they were trained on, named and hashed) plus the head and classes: it loads on that base
(mm.train.classifier.load_classifier; --model OUT/finetuned for mm zeroshot / embed / ..., mm merge to fold it in).
WiSE-FT with --lora scales the adapters' update: alpha * (B A), which is exactly (1 - alpha) * base + alpha *
merged fine-tuned weights. A model with an --adapter is fine-tuned merged (without --lora); --lora on top of an
adapter is refused (mm merge it first).

examples:
  mm finetune --model runs/builtin/final --train 'data/builtin/train-{000000..000003}.tar.gz' \\
      --test data/builtin/test-000000.tar.gz --steps 300 --out runs/builtin_ft
  accelerate launch --multi_gpu --num_processes 8 -m mm.cli finetune --model M --train T --test E --out O
  mm finetune --model runs/flickr8k_coca/final --train ../shared/datasets/cifar10/train-0000.tar.gz \\
      --test ../shared/datasets/cifar10/test-0000.tar.gz --max-test 2000 --steps 300 --batch-size 32 \\
      --lr 1e-4 --templates benchmarks/cifar10_zeroshot_templates.txt --wise-alpha 0,0.25,0.5,0.75,1 \\
      --save-alpha 0.5 --out runs/cifar10_ft
  mm finetune --model runs/builtin/final --train 'data/builtin/train-{000000..000003}.tar.gz' \\
      --test data/builtin/test-000000.tar.gz --lora --lora-rank 8 --lr 1e-3 --steps 300 --out runs/builtin_lora"""


DEFAULT_LORA_TARGETS = "vision.attn"


def _alphas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= a <= 1 for a in values):
        raise argparse.ArgumentTypeError(f"alphas must lie in [0, 1], got {text!r}")
    return values


LORA_OPTIONS = {"lora_rank": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "lora_targets": "targets"}


def _lora_config(args: argparse.Namespace) -> LoraConfig | None:
    """``--lora`` and its options as a LoraConfig (their defaults where not given); None without ``--lora``."""
    given = {field: getattr(args, opt) for opt, field in LORA_OPTIONS.items() if getattr(args, opt) is not None}
    if not args.lora:
        if given:
            raise ValueError(f"--{next(o for o, f in LORA_OPTIONS.items() if f in given).replace('_', '-')} "
                             "needs --lora")
        return None
    if "targets" in given:
        given["targets"] = [t.strip() for t in given["targets"].split(",") if t.strip()]
    return LoraConfig(**{"targets": [DEFAULT_LORA_TARGETS], **given})


@guard(FileNotFoundError, ValueError, *MODEL_ERRORS)
def cmd_finetune(args: argparse.Namespace) -> int:
    values = {name: getattr(args, name) for name in CONFIG_FLAGS}
    values["grad_clip"] = values["grad_clip"] or None  # 0: off
    cfg = validate(FinetuneConfig(**values, lora=_lora_config(args)))
    adapted = args.adapter is not None or (is_adapter_dir(args.model) and not Path(args.model, "config.json").is_file())
    if cfg.lora is not None and adapted:
        raise ValueError("--lora trains adapters of its own on a plain base: fold the adapter in first (mm merge "
                         "--model ... --out MERGED) and fine-tune MERGED")
    if args.max_test is not None and args.max_test < 1:
        raise ValueError(f"--max-test must be >= 1, got {args.max_test}")
    if args.save_alpha is not None and not 0 <= args.save_alpha <= 1:
        raise ValueError(f"--save-alpha must lie in [0, 1], got {args.save_alpha}")
    if args.device not in (None, "cpu", "cuda"):
        raise ValueError(f"--device {args.device}: mm finetune runs on the CPU (cpu) or on each process's GPU (cuda, "
                         "the default where there is one); choose GPUs with CUDA_VISIBLE_DEVICES")
    _, classnames, templates = resolve_shards(args.train, parse_classes(args.classes), parse_templates(args.templates),
                                              "--train")
    check_urls(args.test, "--test")
    reason = not_native(args.model)  # before loading (or downloading) a model fine-tuning cannot use
    if reason:
        raise WrappedModelError(native_only("fine-tuning (mm finetune)", reason))
    run_cfg = run_config(cfg, model=args.model, train=args.train, test=args.test, out=args.out, classes=classnames,
                         templates=templates, pretrained=args.pretrained, adapter=args.adapter,
                         label_key=args.label_key, max_test=args.max_test, wise_alpha=args.wise_alpha,
                         save_alpha=args.save_alpha, device=args.device)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():  # --json: stdout's alone
        result = run(run_cfg)
    if result is not None:  # the main process
        _report(args, cfg, result)
    return 0


def _report(args: argparse.Namespace, cfg: FinetuneConfig, result: dict[str, Any]) -> None:
    if "stopped_at" in result:
        how = "the same command" if cfg.resume == "auto" else "the same command with --resume auto"
        print(f"stopped at step {result['stopped_at']} of {cfg.steps} with a checkpoint; {how} continues",
              file=sys.stderr)
        return
    if args.json:
        print(json.dumps({k: result[k] for k in ("wise", "train_s", "steps", "world_size")}))
    else:
        print("alpha  top-1    top-5")
        for r in result["wise"]:
            note = "  (zero-shot)" if r["alpha"] == 0 else "  (fine-tuned)" if r["alpha"] == 1 else ""
            print(f"{r['alpha']:.2f}  {100 * r['top1']:6.2f}%  {100 * r['top5']:6.2f}%{note}")
        what = "LoRA adapter + head, on its base" if cfg.lora else "fine-tuned model"
        print(f"{what}: {Path(args.out) / 'finetuned'}")
    if cfg.lora and args.pretrained:
        print(f"note: the adapter names its base as {args.model!r}: load it with --pretrained {args.pretrained} "
              "again", file=sys.stderr)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("finetune", help="fine-tune the image tower for classification, with WiSE-FT interpolation",
                       description=DESCRIPTION, formatter_class=EXAMPLES)
    add_model_and_labelled_shards(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (the run directory: resumed when "
                                                                 "it holds checkpoints, see --resume)")
    p.add_argument("--classes", help="class names: a .txt / .json file or a,b,c (default: the shards' info.json)")
    p.add_argument("--templates", help="zero-shot head prompts: a .txt / .json file or one template with {} "
                                       "(default: the shards' info.json, else OpenAI's ImageNet prompts)")
    p.add_argument("--label-key", default="cls", help="the member holding the class index (default: cls)")
    p.add_argument("--wise-alpha", type=_alphas, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="comma-separated interpolation weights to evaluate (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--save-alpha", type=float, default=None, help="also save the model at this alpha (OUT/wise-A/)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test samples")
    p.add_argument("--device", default=None, help="cpu: on the CPU even where a GPU is (default: each process's "
                                                  "accelerator device, else cpu)")
    p.add_argument("--json", action="store_true", help="print the WiSE-FT results as one JSON object (log to stderr)")
    add_config_flags(p, FinetuneConfig, skip=("lora",), choices={"precision": list(PRECISIONS)})
    lora = LoraConfig()
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the image encoder (base frozen) and "
                                                       "the head; saves an adapter directory + head (see above)")
    p.add_argument("--lora-rank", type=int, default=None, help=f"adapter rank (default: {lora.rank})")
    p.add_argument("--lora-alpha", type=float, default=None, help=f"the update is scaled by alpha / rank "
                                                                 f"(default: {lora.alpha:g})")
    p.add_argument("--lora-targets", default=None, metavar="TOWER.KIND,...",
                   help=f"image-encoder layers to adapt, comma-separated; KIND: qkv, out, attn (both), mlp, experts, "
                        f"* (default: {DEFAULT_LORA_TARGETS}; a one-tower model's stack is transformer)")
    p.add_argument("--lora-dropout", type=float, default=None, help=f"dropout on the adapters' input "
                                                                   f"(default: {lora.dropout:g})")
    p.set_defaults(fn=cmd_finetune)


# FinetuneConfig's fields that are options of their own (--batch-size: batch_size); lora is --lora and its options
CONFIG_FLAGS = [f.name for f in dataclasses.fields(FinetuneConfig) if f.name != "lora"]
