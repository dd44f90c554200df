"""``mm ground``: the box a referring expression names in each image, with a LocCa model
(:func:`mm.inference.ground.locate`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..data.decode import BadSample
from ..data.folder import list_images, load_image
from ..hub import load_model
from ..inference.ground import GroundingError, box_tokens, locate
from ..inference.plots import box_sheet
from ..tokenizer import get_tokenizer
from ..utils.io import write_json_atomic
from .common import (
    EXAMPLES,
    MODEL_ARGS,
    MODEL_ERRORS,
    UsageError,
    add_model_options,
    check_out,
    default_device,
    guard,
)

PLOT_MAX = 64  # images drawn by `mm ground --plot`

DESCRIPTION = """\
Print the box the --text names in each image, as a LocCa model (a decoder with box tokens, decoder.loc_bins > 0:
SigLIP 2's recipe, e.g. trained from tiny-siglip2) finds it: one line per image, PATH<TAB>x0,y0,x1,y1<TAB>score<TAB>
text, the box in pixels of the image (x1, y1: its right and bottom edges), the score the mean log-probability of
its four coordinate tokens (0: certain). One --text for every image, or one per image (in the order the images
are listed; folders are searched recursively in sorted order). Unreadable images are skipped and counted.

examples:
  mm ground --model runs/siglip2/final --text "the red circle" scene.png
  mm ground --model runs/siglip2/final --text "the small square" --text "the blue circle" a.png b.png --out boxes.json
  mm ground --model runs/siglip2/final --text "the green triangle" scenes/ --plot boxes.png"""


def _pairs(images: list[str], texts: list[str]) -> list[tuple[Path, str]]:
    paths = list_images(images)
    if not paths:
        raise UsageError("no images found")
    if any(not t.strip() for t in texts):
        raise UsageError("--text: empty")
    if len(texts) == 1:
        return [(p, texts[0]) for p in paths]
    if len(texts) != len(paths):
        raise UsageError(f"--text given {len(texts)} times for {len(paths)} images: give one for every image, "
                         "or one per image")
    return list(zip(paths, texts))


@guard(FileNotFoundError, UsageError, GroundingError, *MODEL_ERRORS)
def cmd_ground(args: argparse.Namespace) -> int:
    try:
        out = check_out(args.out, (".json",))
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.plot and not Path(args.plot).suffix.lower() == ".png":
        raise UsageError(f"--plot {args.plot}: must end in .png")
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be >= 1, got {args.batch_size}")
    pairs = _pairs(args.images, args.text)
    device = default_device(args.device)
    model = load_model(args.model, args.pretrained, device, adapter=args.adapter, names=MODEL_ARGS)
    box_tokens(model)  # no box tokens: one line naming decoder.loc_bins, before any image is read
    tok = get_tokenizer(model)
    results, sheet, bad = [], [], 0
    for start in range(0, len(pairs), args.batch_size):
        chunk, images = [], []
        for path, text in pairs[start:start + args.batch_size]:
            try:
                images.append(load_image(path))
                chunk.append((path, text))
            except BadSample as e:
                bad += 1
                print(f"skipped {path}: {e}", file=sys.stderr)
        if not images:
            continue
        found = locate(model, tok, images, [t for _, t in chunk], batch_size=args.batch_size, device=device)
        for (path, text), img, r in zip(chunk, images, found):
            box = [round(v, 2) for v in r.box]
            print(f"{path}\t{','.join(f'{v:g}' for v in box)}\t{r.score:.4f}\t{text}", flush=True)
            results.append({"image": str(path), "text": text, "box": box, "score": r.score,
                            "width": img.width, "height": img.height})
            if args.plot and len(sheet) < PLOT_MAX:
                sheet.append((img, [(r.box, "")], f"{path.name}\n{text}"))
    if bad:
        print(f"{bad} of {len(pairs)} images could not be read and were skipped", file=sys.stderr)
    if out is not None:
        write_json_atomic(out, {"model": args.model, "results": results})
        print(f"wrote {out}", file=sys.stderr)
    if args.plot:
        print(f"wrote {box_sheet(sheet, args.plot, title=args.model)}", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    s = sub.add_parser("ground", help="find the box a text names in images, with a LocCa model",
                       description=DESCRIPTION, formatter_class=EXAMPLES)
    s.add_argument("images", nargs="+", help="image files or folders")
    add_model_options(s)
    s.add_argument("--text", action="append", required=True,
                   help="the referring expression (\"the red circle\"): once for every image, or once per image")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--out", metavar="JSON", help="also write the results as JSON: {model, results: [{image, text, "
                                                 "box, score, width, height}]}")
    s.add_argument("--plot", metavar="PNG", help=f"also draw the images (the first {PLOT_MAX}) with their boxes to "
                                                 "this PNG")
    s.set_defaults(fn=cmd_ground)
