"""``mm models`` (the presets) and ``mm demo`` (a few training steps on a random batch: the install works)."""
from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from ..hub import create_model
from ..losses import ClipLoss
from ..models import get_preset, list_models
from ..tokenizer import get_tokenizer
from .common import EXAMPLES


def cmd_models(args: argparse.Namespace) -> int:
    for name in list_models():
        cfg = get_preset(name)
        v, t, one = cfg.vision, cfg.text, cfg.one_tower
        stacks = (f"one tower {one.depth}x{one.width}" if one is not None else
                  f"vision {v.transformer.depth}x{v.transformer.width} text {t.transformer.depth}x{t.transformer.width}")
        print(f"{name:22s} image {v.image_size}px/{v.patch_size} {stacks} embed {cfg.embed_dim}")
    return 0


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


def add_models_parser(sub: Any) -> None:
    s = sub.add_parser("models", help="list model presets", description="List model presets.\n\nexample: mm models",
                       formatter_class=EXAMPLES)
    s.set_defaults(fn=cmd_models)


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
