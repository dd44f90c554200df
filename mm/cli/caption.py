"""``mm caption``: captions for image files and folders with a CoCa model (:mod:`mm.inference.generate`), of one
region of each (``--box``, a LocCa model: :func:`mm.inference.ground.caption_regions`), or read with the captions a
datastore retrieves for each image (``--datastore``: :func:`mm.inference.retrieval.caption_with_datastore`)."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import torch

from ..config import validate
from ..data.decode import BadSample
from ..data.folder import list_images, load_image
from ..data.transforms import image_transform
from ..hub import load_model
from ..inference.ann import AnnError
from ..inference.embed import EmbedError, check_query_model, model_fingerprint
from ..inference.generate import GenerationConfig, generate
from ..inference.ground import GroundingError, box_tokens, caption_regions, region_in_input
from ..inference.plots import box_sheet, caption_sheet
from ..inference.retrieval import Datastore, caption_with_datastore
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


def parse_box(text: str | None) -> tuple[float, float, float, float] | None:
    """``--box x0,y0,x1,y1``: four numbers, x0 < x1 and y0 < y1 (pixels of the image)."""
    if text is None:
        return None
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise UsageError(f"--box {text!r}: expected x0,y0,x1,y1 (4 numbers, pixels of the image)")
    if not (box[0] < box[2] and box[1] < box[3]):
        raise UsageError(f"--box {text!r}: needs x0 < x1 and y0 < y1 (x1, y1: the right and bottom edges)")
    return box  # type: ignore[return-value]


@guard(FileNotFoundError, UsageError, GroundingError, *MODEL_ERRORS)
def cmd_caption(args: argparse.Namespace) -> int:
    """One caption per image: "PATH<TAB>caption" lines (or JSON lines with --json)."""
    box = parse_box(args.box)
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
    if box is not None:
        box_tokens(model)  # no box tokens: one line naming decoder.loc_bins
    if getattr(model.config, "decoder", None) is None:
        raise UsageError(f"{args.model} has no captioning decoder: mm caption needs a CoCa model (e.g. "
                         "open_clip:coca_ViT-B-32:laion2b_s13b_b90k, or train tiny-coca)")
    tok, pre = get_tokenizer(model), image_transform(model, train=False)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    if args.datastore:
        if box is not None:
            raise UsageError("--box and --datastore: a region caption does not read retrieved captions")
        args.store, args.retrieval_model = load_datastore(args, model)
    bad, sheet = 0, []  # sheet: (image, caption) for --plot, the first PLOT_MAX images
    for start in range(0, len(paths), args.batch_size):
        chunk, images, pil = [], [], []
        for p in paths[start:start + args.batch_size]:
            try:
                img = load_image(p)
                images.append(pre(img) if box is None and not args.datastore else img)
                chunk.append(p)
                pil.append(img if args.plot and len(sheet) + len(pil) < PLOT_MAX else None)
            except BadSample as e:
                bad += 1
                print(f"skipped {p}: {e}", file=sys.stderr)
        if not images:
            continue
        texts, found = _captions(args, model, tok, gen, generator, images, chunk, box)
        for text, p, img, retrieved in zip(texts, chunk, pil, found):
            row = {"image": str(p), "caption": text} if box is None else {"image": str(p), "box": list(box),
                                                                            "caption": text}
            if args.datastore:
                row["retrieved"] = retrieved
            print(json.dumps(row) if args.json else f"{p}\t{text}", flush=True)
            if img is not None:
                sheet.append((img, f"{p.name}\n{text}"))
    if bad:
        print(f"{bad} of {len(paths)} images could not be read and were skipped", file=sys.stderr)
    if args.plot:
        title = f"{args.model} ({args.method})"
        out = caption_sheet(sheet, args.plot, title=title) if box is None else \
            box_sheet([(img, [(box, "")], text) for img, text in sheet], args.plot, title=title)
        print(f"wrote {out}", file=sys.stderr)
    return 0


def load_datastore(args: argparse.Namespace, model: Any) -> tuple[Datastore, Any]:
    """The datastore and the model that embeds its queries: the captioning model when the datastore was made with
    it (same weights fingerprint), else the model the datastore records."""
    try:
        store = Datastore(args.datastore)
    except (EmbedError, AnnError) as e:
        raise UsageError(f"--datastore {args.datastore}: {e}") from None
    if args.k < 0:
        raise UsageError(f"--k must be >= 0, got {args.k}")
    if store.info.get("model_fingerprint") == model_fingerprint(model):
        return store, model
    if not store.model:
        raise UsageError(f"--datastore {args.datastore} records no model to embed the images with")
    info = store.info
    other = load_model(info["model"], info.get("pretrained"), args.device, adapter=info.get("adapter"),
                       names=MODEL_ARGS)
    try:
        check_query_model(info, other, info["model"], f"--datastore {args.datastore}")
    except EmbedError as e:
        raise UsageError(str(e)) from None
    return store, other


def _captions(args: argparse.Namespace, model: Any, tok: Any, gen: GenerationConfig, generator: torch.Generator,
              images: list[Any], paths: list[Any], box: tuple[float, float, float, float] | None
              ) -> tuple[list[str], list[list[str]]]:
    """Captions of a batch and what each image retrieved (--datastore; else empty lists): of the whole images
    (preprocessed tensors; PIL images with a datastore), or of ``box`` in each (PIL images)."""
    eot = model.config.text.eot_id
    if args.datastore:
        return caption_with_datastore(model, tok, images, args.store, args.retrieval_model, args.k, config=gen,
                                      batch_size=len(images), device=args.device, generator=generator)
    none: list[list[str]] = [[] for _ in images]
    if box is None:
        with torch.no_grad():
            ids = generate(model, torch.stack(images).to(args.device), gen, generator=generator)
        return [tok.decode(row[: row.index(eot)] if eot in row else row) for row in ids.tolist()], none
    for p, img in zip(paths, images):
        try:
            region_in_input(model, box, img.width, img.height)
        except GroundingError as e:
            raise UsageError(f"--box {args.box}: {p}: {e}") from None
    return caption_regions(model, tok, images, [box] * len(images), batch_size=len(images), device=args.device,
                           config=gen, generator=generator), none


def add_parser(sub: Any) -> None:
    s = sub.add_parser(
        "caption", help="caption images with a CoCa model",
        description="Print one caption per image (PATH<TAB>caption). Folders are searched recursively; unreadable "
                    "images are skipped and counted.\n\nexamples:\n  mm caption --model runs/builtin/final photo.jpg\n"
                    "  mm caption --model runs/builtin/final --method sample --top-p 0.9 --seed 1 photos/\n"
                    "  mm caption --model runs/builtin/final --num-beams 5 --no-repeat-ngram 3 --json photos/\n"
                    "  mm caption --model runs/builtin/final examples/ --plot captions.png\n"
                    "  mm caption --model runs/siglip2/final --box 8,8,40,32 --method greedy scene.png",
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
    s.add_argument("--box", metavar="X0,Y0,X1,Y1",
                   help="caption this region of each image (pixels of the image; x1, y1: its right and bottom edges) "
                        "with a LocCa model (a decoder with box tokens, decoder.loc_bins > 0)")
    s.add_argument("--datastore", metavar="DIR", help="retrieval-augmented: the decoder first reads the --k captions "
                   "this datastore (an `mm embed --texts` output, or an `mm index build` over one) returns for the "
                   "image (SmallCap); a model trained with data.retrieval needs it")
    s.add_argument("--k", type=int, default=4, help="retrieved captions in the prompt (--datastore; 0: none)")
    s.add_argument("--seed", type=int, default=0, help="sampling seed")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--json", action="store_true", help="JSON lines {image, caption}")
    s.add_argument("--plot", metavar="PNG", help=f"also draw the images (the first {PLOT_MAX}) with their captions to "
                                                 "this PNG")
    s.set_defaults(fn=cmd_caption)
