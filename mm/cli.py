"""The ``mm`` command. Each subcommand is a small function; heavy imports happen inside them."""
from __future__ import annotations

import argparse
import sys
import time


def cmd_models(args: argparse.Namespace) -> int:
    from .presets import get_preset, list_models

    for name in list_models():
        cfg = get_preset(name)
        v, t = cfg.vision, cfg.text
        print(f"{name:22s} image {v.image_size}px/{v.patch_size} vision {v.transformer.depth}x{v.transformer.width} "
              f"text {t.transformer.depth}x{t.transformer.width} embed {cfg.embed_dim}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Forward/backward steps of a model on a fixed random batch: checks the install end to end."""
    import torch

    from . import ClipLoss, create_model, get_tokenizer

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


def cmd_train(args: argparse.Namespace) -> int:
    from .train.loop import main as train_main

    config = args.config
    overrides = list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml", ".json")):
        overrides.insert(0, config)  # only overrides were given
        config = None
    return train_main(config, overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mm", description="Train and use CLIP-style image-text models.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("models", help="list model presets", description="List model presets.\n\nexample: mm models",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.set_defaults(fn=cmd_models)
    s = sub.add_parser(
        "train", help="train a model from webdataset shards",
        description="Train a model. One YAML config plus section.key=value overrides; run under `accelerate "
                    "launch` for several processes.\n\nexamples:\n  mm train data/builtin.yaml\n"
                    "  mm train data/builtin.yaml train.steps=2000 data.batch_size=128 output_dir=runs/b128\n"
                    "  accelerate launch --multi_gpu --num_processes 2 -m mm.cli train data/builtin.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config", nargs="?", help="YAML/JSON run config (optional if every key is given as an override)")
    s.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    s.set_defaults(fn=cmd_train)
    from .data.sources import add_parser as add_shards_parser

    add_shards_parser(sub)
    s = sub.add_parser("demo", help="forward/backward demo on a random batch",
                       description="Train a model for a few steps on one random batch.\n\nexample: mm demo --model tiny-clip --steps 20",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--model", default="tiny-clip", help="preset name or config file (default: tiny-clip)")
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (no warmup here, so keep it small)")
    s.add_argument("--device", default="cpu")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
