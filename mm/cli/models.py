"""``mm models`` (mm's presets; with ``--open-clip`` every model of open_clip's registry and how mm runs it) and
``mm demo`` (a few training steps on a random batch: the install works)."""
from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from typing import Any

import torch

from ..config import ConfigError
from ..hub import create_model
from ..hub.open_clip_configs import open_clip_model_names, open_clip_preset
from ..losses import ClipLoss
from ..models import ModelConfig, NotNative, get_preset
from ..models.presets import list_models as mm_presets
from ..tokenizer import get_tokenizer
from .common import EXAMPLES, MODEL_ERRORS, guard


def summary(cfg: ModelConfig) -> str:
    """One line of architecture: image size / patch, the stacks (depth x width), embedding width."""
    v, t, one = cfg.vision, cfg.text, cfg.one_tower
    if one is not None:
        stacks = f"one tower {one.depth}x{one.width}"
    else:
        stacks = f"vision {v.transformer.depth}x{v.transformer.width} text {t.transformer.depth}x{t.transformer.width}"
    if cfg.decoder is not None:
        stacks += f" decoder {cfg.decoder.transformer.depth}x{cfg.decoder.transformer.width}"
    return f"image {v.image_size}px/{v.patch_size} {stacks} embed {cfg.embed_dim}"


def how_mm_runs(name: str) -> tuple[str, str]:
    """("native", architecture summary) for an open_clip registry model mm builds with its own blocks, else
    ("open_clip", why not: the part mm does not build)."""
    try:
        return "native", summary(open_clip_preset(name))
    except NotNative as e:
        reason = str(e)
    except ConfigError as e:  # a registry config mm cannot read at all: open_clip still runs it
        reason = f"config not read by mm: {e}"
    return "open_clip", reason.removeprefix(f"{name}: ")


def _matching(names: list[str], patterns: list[str], what: str) -> list[str]:
    """``names`` matching any of the shell ``patterns`` (all without patterns); ConfigError if none does."""
    found = [n for n in names if not patterns or any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    if not found:
        raise ConfigError(f"no {what} matches {' '.join(patterns)} (without patterns all are listed)")
    return found


def cmd_models(args: argparse.Namespace) -> int:
    if not (args.open_clip or args.pretrained):
        for name in _matching(mm_presets(), args.patterns, "mm preset"):  # quick: no open_clip config translated
            print(f"{name:22s} {summary(get_preset(name))}")
        return 0
    if args.pretrained:
        import open_clip  # its pretrained tags are code, not files

        rows = [(f"open_clip:{n}:{tag}", n) for n, tag in open_clip.list_pretrained()]
    else:
        rows = [(n, n) for n in open_clip_model_names()]
    names = set(_matching(sorted({n for _, n in rows}), args.patterns, "open_clip model"))
    rows = [(label, n) for label, n in rows if n in names]
    width = max(len(label) for label, _ in rows)
    known: dict[str, tuple[str, str]] = {}  # several tags share a name: translate it once
    for label, name in rows:
        if name not in known:
            known[name] = how_mm_runs(name)
        kind, note = known[name]
        print(f"{label:{width}s}  {kind:9s}  {note}", flush=True)  # flushed: timm towers take a moment each
    n_native = sum(kind == "native" for kind, _ in known.values())
    print(f"{n_native} of {len(known)} models native (mm's blocks); the others run through open_clip: zeroshot, "
          "embed, search, eval, probe and distill.teacher work, training / finetune / export / int8 do not",
          file=sys.stderr)
    return 0


@guard(*MODEL_ERRORS)
def cmd_demo(args: argparse.Namespace) -> int:
    """Forward/backward steps of a model on a fixed random batch: checks the install end to end."""
    torch.manual_seed(0)
    model = create_model(args.model)
    tok = get_tokenizer(model)
    v = model.config.vision
    images = torch.randn(args.batch, 3, v.image_size, v.image_size)
    tokens = tok([f"a photo of object number {i}" for i in range(args.batch)])
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params:,} parameters, batch {args.batch}, {args.steps} steps on {args.device}")
    model.to(args.device)
    images, tokens = images.to(args.device), tokens.to(args.device)
    times = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        loss = loss_fn(model(images, tokens))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if step == 1 or step % 5 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.4f}  {times[-1] * 1000:.0f} ms/step")
    steady = sorted(times[1:])[len(times[1:]) // 2] if len(times) > 1 else times[0]
    print(f"median step {steady * 1000:.0f} ms ({args.batch / steady:.0f} samples/s); "
          "the loss falls as the model memorises the batch")
    return 0


MODELS_DESCRIPTION = """\
List mm's model presets. With --open-clip, every model of open_clip's registry and how mm runs it: native
(built with mm's own blocks; the architecture follows) or open_clip (run through open_clip itself, and why:
the part mm does not build). Native models do everything; the others work with zeroshot, embed, search, eval,
probe and as a distill.teacher. With --pretrained, open_clip's pretrained weights as --model specs
(open_clip:NAME:TAG). PATTERNs (shell globs) select model names. Translating open_clip's timm towers takes a
moment each (~1 min for the whole registry).

examples:
  mm models
  mm models --open-clip
  mm models --open-clip 'ViT-B-*' 'convnext_*'
  mm models --pretrained 'ViT-B-32*'"""


def add_models_parser(sub: Any) -> None:
    s = sub.add_parser("models", help="list model presets (--open-clip: open_clip's models and how mm runs them)",
                       description=MODELS_DESCRIPTION, formatter_class=EXAMPLES)
    s.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="list only the model names matching these shell globs")
    s.add_argument("--open-clip", action="store_true",
                   help="list open_clip's registry: native (mm's blocks, with the architecture) or open_clip (why)")
    s.add_argument("--pretrained", action="store_true",
                   help="list open_clip's pretrained weights (open_clip:NAME:TAG) and how mm runs each")
    s.set_defaults(fn=guard(*MODEL_ERRORS)(cmd_models))


def add_demo_parser(sub: Any) -> None:
    s = sub.add_parser("demo", help="forward/backward demo on a random batch",
                       description="Train a model for a few steps on one random batch.\n\nexample: mm demo --model tiny-clip --steps 20",
                       formatter_class=EXAMPLES)
    s.add_argument("--model", default="tiny-clip", help="preset name or config file (default: tiny-clip)")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (no warmup here, so keep it small)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_demo)
