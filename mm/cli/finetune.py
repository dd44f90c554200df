"""``mm finetune``: classification fine-tuning of a model's image tower from its zero-shot head, with WiSE-FT
(:mod:`mm.train.finetune`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..config import validate
from ..data.wds import check_urls
from ..eval.classify import resolve_shards
from ..hub import is_adapter_dir, load_model, parse_spec
from ..hub.wrapped import WrappedModelError, native_only
from ..layers.config import LoraConfig
from ..layers.lora import merge_lora
from ..train.config import not_native
from ..train.finetune import FinetuneConfig, run
from ..utils import dist
from ..utils.precision import PRECISIONS
from .common import (
    EXAMPLES,
    MODEL_ERRORS,
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
classifier.safetensors and classes.json), OUT/wise-A/ with --save-alpha A, OUT/metrics.jsonl, OUT/results.json.

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


def _adapter_base(args: argparse.Namespace) -> str | None:
    """What a LoRA fine-tune's adapter names as its base: a model directory (absolute, found from anywhere),
    open_clip:NAME[:TAG], or a preset / config with --pretrained (which must be given again to reload it);
    None for random weights, which no spec reproduces."""
    s = parse_spec(args.model)
    if s.kind == "dir":
        return str(s.path.resolve())
    if s.kind == "open_clip" or args.pretrained:
        return args.model
    return None


@guard(FileNotFoundError, ValueError, *MODEL_ERRORS)
def cmd_finetune(args: argparse.Namespace) -> int:
    cfg = validate(FinetuneConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip or None, label_smoothing=args.label_smoothing,
        layer_decay=args.layer_decay, head_lr_mult=args.head_lr_mult, workers=args.workers, precision=args.precision,
        seed=args.seed, log_every=args.log_every, lora=_lora_config(args)))
    adapted = args.adapter is not None or (is_adapter_dir(args.model) and not Path(args.model, "config.json").is_file())
    if cfg.lora is not None and adapted:
        raise ValueError("--lora trains adapters of its own on a plain base: fold the adapter in first (mm merge "
                         "--model ... --out MERGED) and fine-tune MERGED")
    if args.max_test is not None and args.max_test < 1:
        raise ValueError(f"--max-test must be >= 1, got {args.max_test}")
    if args.save_alpha is not None and not 0 <= args.save_alpha <= 1:
        raise ValueError(f"--save-alpha must lie in [0, 1], got {args.save_alpha}")
    train_urls, classnames, templates = resolve_shards(args.train, parse_classes(args.classes),
                                                       parse_templates(args.templates), "--train")
    test_urls = check_urls(args.test, "--test")
    reason = not_native(args.model)  # before loading (or downloading) a model fine-tuning cannot use
    if reason:
        raise WrappedModelError(native_only("fine-tuning (mm finetune)", reason))
    device = args.device or str(dist.start())  # forms the process group under `accelerate launch`
    model = load_model(args.model, args.pretrained, device, adapter=args.adapter)
    if adapted:  # fine-tuning trains (and saves) ordinary weights: the adapter folded in
        merge_lora(model)
    result = run(model, train_urls, test_urls, classnames, templates, cfg, args.wise_alpha, args.out,
                 label_key=args.label_key, max_test=args.max_test, save_alpha=args.save_alpha,
                 log=lambda s: print(s, file=sys.stderr if args.json else sys.stdout, flush=True),
                 base=_adapter_base(args) if cfg.lora else None)
    if result is None:  # not the main process
        return 0
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
    return 0


def add_parser(sub: Any) -> None:
    d = FinetuneConfig()
    p = sub.add_parser("finetune", help="fine-tune the image tower for classification, with WiSE-FT interpolation",
                       description=DESCRIPTION, formatter_class=EXAMPLES)
    add_model_and_labelled_shards(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--classes", help="class names: a .txt / .json file or a,b,c (default: the shards' info.json)")
    p.add_argument("--templates", help="zero-shot head prompts: a .txt / .json file or one template with {} "
                                       "(default: the shards' info.json, else OpenAI's ImageNet prompts)")
    p.add_argument("--label-key", default="cls", help="the member holding the class index (default: cls)")
    p.add_argument("--wise-alpha", type=_alphas, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="comma-separated interpolation weights to evaluate (default: 0,0.25,0.5,0.75,1)")
    p.add_argument("--save-alpha", type=float, default=None, help="also save the model at this alpha (OUT/wise-A/)")
    p.add_argument("--max-test", type=int, default=None, help="evaluate on the first N test samples")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default: {d.lr})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip, help="max gradient norm (0: off)")
    p.add_argument("--label-smoothing", type=float, default=d.label_smoothing)
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay of the image encoder, "
                                                                   "e.g. 0.65 (default: off)")
    p.add_argument("--head-lr-mult", type=float, default=d.head_lr_mult, help="the head's lr = --lr x this "
                                                                             "(default: 1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--workers", type=int, default=d.workers, help="image loading processes (0: load in this one)")
    p.add_argument("--device", default=None, help="default: this process's accelerator device, else cpu")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="autocast (default: fp32, none)")
    p.add_argument("--json", action="store_true", help="print the WiSE-FT results as one JSON object (log to stderr)")
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
