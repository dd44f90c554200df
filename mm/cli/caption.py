"""``mm caption``: captions for image files and folders with a CoCa model (:mod:`mm.inference.generate`)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from ..config import validate
from ..data.decode import BadSample
from ..data.folder import list_images, load_image
from ..data.transforms import image_transform
from ..hub import load_model
from ..inference.generate import GenerationConfig, generate
from ..inference.plots import caption_sheet
from ..tokenizer import get_tokenizer
from .common import (
    EXAMPLES,
    MODEL_ARGS,
    MODEL_ERRORS,
    UsageError,
    add_model_options,
    default_device,
    guard,
)

PLOT_MAX = 64  # images drawn by `mm caption --plot`


@guard(FileNotFoundError, UsageError, *MODEL_ERRORS)
def cmd_caption(args: argparse.Namespace) -> int:
    """One caption per image: "PATH<TAB>caption" lines (or JSON lines with --json)."""
    paths = list_images(args.images)
    if not paths:
        raise UsageError("no images found")
    args.device = default_device(args.device)
    gen = validate(GenerationConfig(
        method=args.method, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, length_penalty=args.length_penalty, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        no_repeat_ngram_size=args.no_repeat_ngram))
    model = load_model(args.model, args.pretrained, args.device, adapter=args.adapter, names=MODEL_ARGS)
    if getattr(model.config, "decoder", None) is None:
        raise UsageError(f"{args.model} has no captioning decoder: mm caption needs a CoCa model (e.g. "
                         "open_clip:coca_ViT-B-32:laion2b_s13b_b90k, or train tiny-coca)")
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
        out = caption_sheet(sheet, args.plot, title=f"{args.model} ({args.method})")
        print(f"wrote {out}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "caption", help="caption images with a CoCa model",
        description="Print one caption per image (PATH<TAB>caption). Folders are searched recursively; unreadable "
                    "images are skipped and counted.\n\nexamples:\n  mm caption --model runs/builtin/final photo.jpg\n"
                    "  mm caption --model runs/builtin/final --method sample --top-p 0.9 --seed 1 photos/\n"
                    "  mm caption --model runs/builtin/final --num-beams 5 --no-repeat-ngram 3 --json photos/\n"
                    "  mm caption --model runs/builtin/final examples/ --plot captions.png",
        formatter_class=EXAMPLES)
    s.add_argument("images", nargs="+", help="image files or folders")
    add_model_options(s)
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
