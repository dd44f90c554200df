"""``mm shards``: make webdataset shards (a table, img2dataset output, the built-in set, scenes or mixed-aspect images)
and write shards back out as files (``mm.data.sources``, ``mm.data.synthetic``, ``mm.data.scenes``,
``mm.data.aspect``)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..data import aspect, scenes, synthetic
from ..data.shards import DEFAULT_MAX_PIXELS
from ..data.sources import extract, from_img2dataset, from_table
from .common import guard

# `mm shards builtin` (and data/make_builtin.py): what mm.data.synthetic.generate draws, or with --scenes
# mm.data.scenes.generate_scenes, with --aspect mm.data.aspect.generate_aspect
BUILTIN_DESCRIPTION = ("Draw the built-in synthetic captioned data set: one coloured shape per image on a noisy\n"
                       "gradient; 30 zero-shot classes '{colour} {shape}'. Writes train-*.tar.gz, test-*.tar.gz and\n"
                       "info.json (both splits, classes, zero-shot templates) into OUT_DIR.\n"
                       "--scenes: 64 px scenes of one large and 1-2 small shapes instead, each sample with the\n"
                       "shapes' boxes and referring expressions (json 'objects', 'regions') and a shape map\n"
                       "KEY.seg.png; the class is the large shape's.\n"
                       "--aspect: one shape per image on canvases of aspect 1:4, 1:2, 1:1, 2:1 and 4:1 (--image-size\n"
                       "is the long side, default 128), sized by the short side and placed anywhere along the long\n"
                       "one, so a centre square crop often misses it; json 'aspect' and the shape's 'box'.\n\n"
                       "example: mm shards builtin data/builtin --n-train 20000 --n-test 2000\n"
                       "example: mm shards builtin data/scenes --scenes\n"
                       "example: mm shards builtin data/aspect --aspect")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", default="train", help="shard name prefix: PREFIX-000000.tar (default: train)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="at most this many samples per shard")
    p.add_argument("--gzip", action="store_true", help="write .tar.gz (worth it for small images)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help=f"skip images with more pixels; 0: no limit (default: PIL's, {DEFAULT_MAX_PIXELS})")


@guard(FileNotFoundError, ValueError)  # bad paths and columns: one clear line, exit 2
def _run_table(args: argparse.Namespace) -> int:
    classes = None
    if args.classes:
        p = Path(args.classes)
        classes = [c for c in p.read_text(encoding="utf-8").splitlines() if c.strip()] if p.is_file() \
            else [c.strip() for c in args.classes.split(",")]
    info = from_table(args.table, args.image_root, args.out_dir, prefix=args.prefix, image_col=args.image_col,
                      caption_col=args.caption_col, label_col=args.label_col, classes=classes,
                      samples_per_shard=args.samples_per_shard, compress=args.gzip, max_pixels=args.max_pixels or None)
    return 0 if info["num_samples"] else 1


@guard(FileNotFoundError, ValueError)  # bad paths and columns: one clear line, exit 2
def _run_img2dataset(args: argparse.Namespace) -> int:
    info = from_img2dataset(args.in_dir, args.out_dir, prefix=args.prefix, samples_per_shard=args.samples_per_shard,
                            compress=args.gzip, max_pixels=args.max_pixels or None)
    return 0 if info["num_samples"] else 1


@guard(FileNotFoundError, ValueError)  # bad paths and columns: one clear line, exit 2
def _run_extract(args: argparse.Namespace) -> int:
    if args.n is not None and args.n < 1:
        raise ValueError(f"-n must be >= 1, got {args.n}")
    return 0 if extract(args.shards, args.out_dir, args.n) else 1


def add_commands(sub: Any) -> None:
    """Add the ``csv``, ``img2dataset``, ``extract`` and ``builtin`` commands to an argparse subparsers object."""

    fmt = argparse.RawDescriptionHelpFormatter
    p = sub.add_parser("csv", aliases=["table"], formatter_class=fmt, help="image paths + captions table -> shards",
                       description="Shard a CSV, TSV or JSONL table of image paths and captions (and labels).\n"
                       "Rows naming the same image become one sample with all its captions.\n\n"
                       "example: mm shards csv pairs.csv shards/ --image-root images/ --label-col label\n"
                       "example: mm shards csv captions.jsonl shards/ --caption-col text --gzip")
    p.add_argument("table", help="CSV / TSV (header row) or JSONL file")
    p.add_argument("out_dir", help="folder for the shards and info.json")
    p.add_argument("--image-root", default=None, help="folder image paths are relative to (default: the table's)")
    p.add_argument("--image-col", default="image", help="image path column (default: image)")
    p.add_argument("--caption-col", default="caption", help="caption column (default: caption)")
    p.add_argument("--label-col", default=None, help="optional label column: integer indices or class names")
    p.add_argument("--classes", default=None,
                   help="class names in index order: a file with one per line, or a comma-separated list")
    _common(p)
    p.set_defaults(fn=_run_table)
    p = sub.add_parser("img2dataset", formatter_class=fmt, help="img2dataset output -> validated shards",
                       description="Re-shard img2dataset output, validating every image and caption.\n"
                       "Accepts its 'files' layout (00000/000000000.jpg, .txt, .json) or tar shards.\n\n"
                       "example: mm shards img2dataset downloaded/ shards/ --samples-per-shard 5000")
    p.add_argument("in_dir", help="img2dataset output folder")
    p.add_argument("out_dir", help="folder for the shards and info.json")
    _common(p)
    p.set_defaults(fn=_run_img2dataset)
    p = sub.add_parser("extract", formatter_class=fmt, help="shards -> image files + captions (to look at, or for "
                       "the folder commands)",
                       description="Write samples of webdataset shards out as files: KEY.jpg (the stored bytes) and\n"
                       "KEY.txt (the caption), the first N samples in shard order.\n\n"
                       "example: mm shards extract data/builtin/test-000000.tar.gz examples/ -n 16")
    p.add_argument("shards", help="shard files or URLs (brace ranges expand, :: joins sets)")
    p.add_argument("out_dir", help="folder for the files")
    p.add_argument("-n", type=int, default=None, help="at most this many samples (default: all)")
    p.set_defaults(fn=_run_extract)
    p = sub.add_parser("builtin", formatter_class=fmt, help="draw the built-in synthetic captioned data set",
                       description=BUILTIN_DESCRIPTION)
    add_builtin_arguments(p)
    p.set_defaults(fn=run_builtin)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``mm shards {csv,img2dataset,builtin,extract}`` to the ``mm`` command's subparsers; returns its parser."""
    p = subparsers.add_parser("shards", help="make webdataset shards (table, img2dataset, built-in set); extract them",
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              description="Make webdataset shards, or write shards back out as files.\n\n"
                              "example: mm shards builtin data/builtin")
    add_commands(p.add_subparsers(dest="shards_command", required=True, metavar="{csv,img2dataset,builtin,extract}"))
    return p


def add_builtin_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", nargs="?", default="data/builtin", help="output folder (default: data/builtin)")
    p.add_argument("--n-train", type=int, default=20000, help="training images (default: 20000)")
    p.add_argument("--n-test", type=int, default=2000, help="held-out images (default: 2000)")
    p.add_argument("--image-size", type=int, default=None,
                   help="image side in pixels (default: 32; 64 with --scenes); with --aspect the long side "
                   "(default: 128)")
    p.add_argument("--seed", type=int, default=0, help="seed; train and test use disjoint streams of it")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--gzip", action=argparse.BooleanOptionalAction, default=True,
                   help="write .tar.gz shards (default; --no-gzip: plain .tar)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--scenes", action="store_true",
                      help="several shapes per image with boxes, region captions and a shape map (mm.data.scenes)")
    kind.add_argument("--aspect", action="store_true",
                      help="one shape per image on canvases of mixed aspect ratios, with its box (mm.data.aspect)")


@guard(FileNotFoundError, ValueError)
def run_builtin(args: argparse.Namespace) -> int:
    if args.scenes:
        size = 64 if args.image_size is None else args.image_size
        scenes.generate_scenes(args.out_dir, args.n_train, args.n_test, size, args.seed, args.samples_per_shard,
                               args.gzip)
    elif args.aspect:
        size = 128 if args.image_size is None else args.image_size
        aspect.generate_aspect(args.out_dir, args.n_train, args.n_test, size, args.seed, args.samples_per_shard,
                               args.gzip)
    else:
        size = 32 if args.image_size is None else args.image_size
        synthetic.generate(args.out_dir, args.n_train, args.n_test, size, args.seed, args.samples_per_shard, args.gzip)
    return 0
