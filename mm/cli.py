"""The ``mm`` command. Each subcommand is a small function; heavy imports happen inside them."""
from __future__ import annotations

import argparse
import sys
import time


def cmd_models(args: argparse.Namespace) -> int:
    from .presets import get_preset, list_models

    for name in list_models():
        cfg = get_preset(name)
        v, t, one = cfg.vision, cfg.text, cfg.one_tower
        stacks = (f"one tower {one.depth}x{one.width}" if one is not None else
                  f"vision {v.transformer.depth}x{v.transformer.width} text {t.transformer.depth}x{t.transformer.width}")
        print(f"{name:22s} image {v.image_size}px/{v.patch_size} {stacks} embed {cfg.embed_dim}")
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
    from .config import ConfigError

    try:
        return train_main(config, overrides)
    except ConfigError as e:  # a bad key or value: one line naming it, not a traceback
        print(f"error: {e}", file=sys.stderr)
        return 2


def cmd_caption(args: argparse.Namespace) -> int:
    """One caption per image: "PATH<TAB>caption" lines (or JSON lines with --json)."""
    import json

    import torch

    from . import get_tokenizer, image_transform
    from .config import ConfigError, validate
    from .data.decode import BadSample
    from .data.folder import list_images, load_image
    from .generate import GenerationConfig, generate
    from .pretrained import load_model

    try:
        paths = list_images(args.images)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths:
        print("error: no images found", file=sys.stderr)
        return 2
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        gen = validate(GenerationConfig(
            method=args.method, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = load_model(args.model, args.pretrained, args.device)
    if getattr(model.config, "decoder", None) is None:
        print(f"error: {args.model} has no captioning decoder (train or load a CoCa model, e.g. tiny-coca)",
              file=sys.stderr)
        return 2
    tok, pre = get_tokenizer(model), image_transform(model, train=False)
    eot = model.config.text.eot_id
    generator = torch.Generator(args.device).manual_seed(args.seed)
    bad, sheet = 0, []  # sheet: (image, caption) for --plot, the first PLOT_MAX images
    for start in range(0, len(paths), args.batch_size):
        chunk, images, pil = [], [], []
        for p in paths[start:start + args.batch_size]:
            try:
                img = load_image(p)
                images.append(pre(img))
                chunk.append(p)
                pil.append(img if args.plot and len(sheet) + len(pil) < PLOT_MAX else None)
            except BadSample as e:
                bad += 1
                print(f"skipped {p}: {e}", file=sys.stderr)
        if not images:
            continue
        with torch.no_grad():
            ids = generate(model, torch.stack(images).to(args.device), gen, generator=generator)
        for p, row, img in zip(chunk, ids.tolist(), pil):
            text = tok.decode(row[: row.index(eot)] if eot in row else row)
            print(json.dumps({"image": str(p), "caption": text}) if args.json else f"{p}\t{text}", flush=True)
            if img is not None:
                sheet.append((img, f"{p.name}\n{text}"))
    if bad:
        print(f"{bad} of {len(paths)} images could not be read and were skipped", file=sys.stderr)
    if args.plot:
        from .plots import caption_sheet

        out = caption_sheet(sheet, args.plot, title=f"{args.model} ({args.method})")
        print(f"wrote {out}", file=sys.stderr)
    return 0


PLOT_MAX = 64  # images drawn by `mm caption --plot`


MODEL_HELP = ("an mm model directory (a run's final/ or save_pretrained), open_clip:NAME[:TAG] (open_clip's "
              "registry), or a preset name with --pretrained FILE")


def cmd_convert(args: argparse.Namespace) -> int:
    """open_clip / Hugging Face -> mm directory, or mm directory -> open_clip weights file."""
    from pathlib import Path

    from .interop.open_clip import ConversionError
    from .pretrained import PretrainedError, load_model, load_pretrained, save_pretrained

    try:
        if args.to_open_clip:
            if not args.model or not Path(args.model).is_dir():
                print("error: --to-open-clip needs --model DIR (an mm model directory)", file=sys.stderr)
                return 2
            from .interop.open_clip import to_open_clip

            sd = {k: v.detach().contiguous().cpu() for k, v in to_open_clip(load_pretrained(args.model)).items()}
            out = Path(args.to_open_clip)
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.suffix == ".safetensors":
                from safetensors.torch import save_file

                save_file(sd, str(out))
            else:
                import torch

                torch.save(sd, out)
            print(f"wrote {out} ({len(sd)} tensors); load it with open_clip.create_model_and_transforms(NAME, "
                  f"pretrained={str(out)!r})")
            return 0
        if not args.source or not args.to:
            print("error: give --from SOURCE --to DIR, or --model DIR --to-open-clip FILE", file=sys.stderr)
            return 2
        if args.source.startswith("hf:"):
            from .interop.hf import from_hf_clip

            model = from_hf_clip(args.source[3:])
        elif args.source.startswith("open_clip:"):
            model = load_model(args.source)
        else:  # a weights file: the architecture comes from --model (a preset name or config file)
            if not args.model:
                print("error: converting a weights file needs --model PRESET (e.g. ViT-B-32)", file=sys.stderr)
                return 2
            model = load_model(args.model, pretrained=args.source)
        save_pretrained(model, args.to)
        print(f"wrote {args.to} ({sum(p.numel() for p in model.parameters()):,} parameters)")
        return 0
    except (ConversionError, PretrainedError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


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
                    "  mm train data/builtin.yaml model=micro-clip distill.teacher=runs/builtin/final "
                    "output_dir=runs/micro_distilled\n"
                    "  accelerate launch --multi_gpu --num_processes 2 -m mm.cli train data/builtin.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("config", nargs="?", help="YAML/JSON run config (optional if every key is given as an override)")
    s.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.lr=1e-3")
    s.set_defaults(fn=cmd_train)
    # commands whose code lives with what they do
    from .data.sources import add_parser as add_shards_parser
    from .embed import add_parser as add_embed_parser
    from .eval.commands import add_parsers as add_eval_parsers
    from .export import add_parser as add_export_parser
    from .eval.probe import add_parser as add_probe_parser
    from .finetune import add_parser as add_finetune_parser
    from .search import add_parser as add_search_parser

    for add in (add_shards_parser, add_embed_parser, add_search_parser, add_eval_parsers, add_probe_parser,
                add_finetune_parser, add_export_parser):
        add(sub)
    s = sub.add_parser(
        "caption", help="caption images with a CoCa model",
        description="Print one caption per image (PATH<TAB>caption). Folders are searched recursively; unreadable "
                    "images are skipped and counted.\n\nexamples:\n  mm caption --model runs/builtin/final photo.jpg\n"
                    "  mm caption --model runs/builtin/final --method sample --top-p 0.9 --seed 1 photos/\n"
                    "  mm caption --model runs/builtin/final --num-beams 5 --no-repeat-ngram 3 --json photos/\n"
                    "  mm caption --model runs/builtin/final examples/ --plot captions.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("images", nargs="+", help="image files or folders")
    s.add_argument("--model", required=True, help=MODEL_HELP)
    s.add_argument("--pretrained", help="weights file for a preset --model (mm or open_clip checkpoint)")
    s.add_argument("--method", default="beam", choices=["beam", "greedy", "sample"])
    s.add_argument("--num-beams", type=int, default=4)
    s.add_argument("--length-penalty", type=float, default=1.0, help="beam: > 0 favours longer captions")
    s.add_argument("--max-new-tokens", type=int, default=None, help="default: up to the context length")
    s.add_argument("--min-new-tokens", type=int, default=0)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    s.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--no-repeat-ngram", type=int, default=0, help="forbid repeating n-grams of this size")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--json", action="store_true", help="JSON lines {image, caption}")
    s.add_argument("--plot", metavar="PNG", help=f"also draw the images (the first {PLOT_MAX}) with their captions to "
                                                 "this PNG")
    s.set_defaults(fn=cmd_caption)
    s = sub.add_parser(
        "convert", help="convert open_clip / Hugging Face checkpoints to mm and back",
        description="Convert weights exactly (tensor for tensor).\n\nexamples:\n"
                    "  mm convert --from open_clip:ViT-B-32:laion2b_s34b_b79k --to models/b32\n"
                    "  mm convert --from open_clip_b32.safetensors --model ViT-B-32 --to models/b32\n"
                    "  mm convert --from hf:/path/to/clip-vit-base-patch32 --to models/hf_b32\n"
                    "  mm convert --model runs/b32/final --to-open-clip b32_open_clip.safetensors",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    s.add_argument("--from", dest="source", help="open_clip:NAME[:TAG], hf:DIR, or an open_clip/mm weights file")
    s.add_argument("--to", help="output mm model directory")
    s.add_argument("--model", help="architecture (preset) for a weights file; the mm directory for --to-open-clip")
    s.add_argument("--to-open-clip", help="write the open_clip state dict of --model DIR to this file "
                                          "(.safetensors, else torch.save)")
    s.set_defaults(fn=cmd_convert)
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
    from .host import tune_malloc

    args = build_parser().parse_args(argv)
    tune_malloc()  # a command owns its process: reuse freed activations' pages (mm/host.py says why)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
