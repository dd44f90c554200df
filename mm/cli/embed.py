"""``mm embed`` (embeddings of many images or texts on disk, resumable) and ``mm search`` (exact top-k over
them), over :mod:`mm.inference.embed` and :mod:`mm.inference.search`."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.decode import BadSample
from ..data.folder import load_image
from ..data.transforms import image_transform, stack_images
from ..hub import load_model
from ..inference.embed import (
    INDEX_NAME,
    PLAN_NAME,
    SKIPPED_NAME,
    EmbedError,
    check_out_dir,
    check_query_model,
    plan_images,
    plan_texts,
    read_index,
    run_embed,
)
from ..inference.ann import is_ann, read_ann
from ..inference.ann import search as ann_search
from ..inference.search import merge_topk, plot_results, require_faiss, search
from ..tokenizer import get_tokenizer
from ..utils import dist
from ..utils.host import default_workers
from ..utils.io import write_json_atomic
from .common import (
    EXAMPLES,
    MODEL_ARGS,
    MODEL_ERRORS,
    MODEL_HELP,
    add_model_options,
    add_seq_len,
    check_seq_len,
    default_device,
    guard,
)

ADAPTER_NAME = "adapter.json"  # in an embed output directory: the --adapter the embeddings were made with


def _check_adapter(out: Path, adapter: str | None) -> str | None:
    """``--adapter`` as the output records it (absolute, so ``mm search`` finds it from anywhere). Another adapter
    gives other embeddings, so a rerun into ``out`` must name the same one: the adapter is recorded in
    ``out/adapter.json`` before any part is written (absent: the run had none), and in index.json at the end.
    (The library's plan.json does not know adapters; this keeps the check in the command that adds them.)"""
    recorded = str(Path(adapter).resolve()) if adapter else None
    if (out / PLAN_NAME).is_file():
        side = out / ADAPTER_NAME
        was = json.loads(side.read_text())["adapter"] if side.is_file() else None
        if was != recorded:
            raise EmbedError(f"{out} holds an embed run with a different adapter (was {was!r}); use a new --out "
                             "directory, or the same inputs and options to resume")
    return recorded


@guard(EmbedError, *MODEL_ERRORS)
def cmd_embed(args: argparse.Namespace) -> int:
    if args.chunk_size < 1 or args.batch_size < 1:
        raise EmbedError("--chunk-size and --batch-size must be >= 1")
    chunks = plan_texts(args.texts, args.chunk_size, "--texts") if args.texts else \
        plan_images(args.images, args.chunk_size, "--images")
    kind = "texts" if args.texts else "images"
    normalize = not args.no_normalize
    # fail on a mismatched output directory before the model is loaded
    check_out_dir(args.out, chunks, model_spec=args.model, pretrained=args.pretrained, normalize=normalize,
                  dtype=args.dtype, quantize=args.quantize, seq_len=None if args.texts else args.seq_len)
    adapter = _check_adapter(Path(args.out), args.adapter)
    started = dist.start()  # forms the process group under `accelerate launch`
    device = args.device or str(started)
    if args.quantize == "int8" and not device.startswith("cpu"):
        raise EmbedError(f"--quantize int8 runs on the CPU (--device cpu); on {device} use int8-weight")
    model = load_model(args.model, args.pretrained, device, adapter=args.adapter, names=MODEL_ARGS)
    try:
        seq_len = None if args.texts else check_seq_len(model, args.seq_len)
    except ValueError as e:
        raise EmbedError(str(e)) from None
    if dist.is_main():  # before any part is written: an interrupted run keeps the record
        side = Path(args.out) / ADAPTER_NAME
        if adapter is not None:
            side.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(side, {"adapter": adapter})
        elif side.is_file():  # left by an earlier run that wrote no plan (checked above): not this run's
            side.unlink()
    t0 = time.perf_counter()
    index = run_embed(model, chunks, args.out, model_spec=args.model, pretrained=args.pretrained,
                      batch_size=args.batch_size, workers=args.workers, normalize=normalize,
                      precision=args.precision, dtype=args.dtype, quantize=args.quantize, seq_len=seq_len)
    if dist.is_main():
        if adapter is not None:  # index.json names the whole model: `mm search` loads the same one for queries
            write_json_atomic(Path(args.out) / INDEX_NAME, {**index, "adapter": adapter})
        skipped = f", {index['skipped']} skipped (see {Path(args.out) / SKIPPED_NAME})" if index["skipped"] else ""
        print(f"{index['count']} {kind} embedded (dim {index['embed_dim']}) in {len(index['parts'])} parts, "
              f"{time.perf_counter() - t0:.2f} s; index: {Path(args.out) / INDEX_NAME}{skipped}", file=sys.stderr)
    return 0


def add_embed_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "embed", help="embed images or texts into a directory of .npy chunks (resumable)",
        description="Embed images (files, folders, webdataset shards) or texts with a model, in resumable chunks "
                    "(rerun the same command to finish an interrupted run). Under `accelerate launch` each process "
                    "embeds its share.\n\nexamples:\n"
                    "  mm embed --model runs/builtin/final --images photos/ --out emb/photos\n"
                    "  mm embed --model open_clip:ViT-B-32:laion2b_s34b_b79k --images 'shards/{000000..000099}.tar' "
                    "--out emb/laion --dtype float16\n"
                    "  mm embed --model runs/builtin/final --texts captions.txt --out emb/captions\n"
                    "  mm embed --model runs/builtin/final --images photos/ --out emb/photos_int8 --quantize int8\n"
                    "  mm embed --model runs/builtin/final --adapter runs/lora/final --images photos/ --out emb/lora\n"
                    "  accelerate launch --multi_gpu --num_processes 8 -m mm.cli embed --model M --images photos/ "
                    "--out emb/photos",
        formatter_class=EXAMPLES)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", metavar="INPUT",
                     help="image files, folders (recursive) or webdataset shards (.tar/.tar.gz, brace ranges)")
    src.add_argument("--texts", metavar="FILE|SHARDS",
                     help="one text a line, a .json list of strings, .jsonl with a \"text\" field, or webdataset "
                     "shards: their captions (json 'captions', else txt), ids KEY#I (a retrieval datastore)")
    add_model_options(s)
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader workers decoding images (0: in-process; default: the available cores but one, "
                        "1 to 4)")
    s.add_argument("--chunk-size", type=int, default=4096, help="rows per output part (a shard is one part)")
    s.add_argument("--no-normalize", action="store_true", help="keep raw embeddings (default: L2-normalised)")
    s.add_argument("--device", default=None, help="default: this process's accelerator device, else cpu")
    s.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, fp32 on CPU")
    s.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="stored dtype")
    s.add_argument("--quantize", choices=["int8", "int8-weight"], default=None,
                   help="int8 Linear layers (mm.quantize): int8 = dynamic, CPU; int8-weight = weight-only, any device")
    add_seq_len(s)
    s.set_defaults(fn=cmd_embed)
    return s


def _embed_queries(index: dict[str, Any], args: argparse.Namespace, shards: list[dict[str, Any]]) -> np.ndarray:
    """The queries embedded by ``--model``, else by the model the first index (``index``) records, after checking
    it is the model of every index searched (``shards``: their index.json contents, in --index order)."""
    spec = args.model or index.get("model")
    if not spec:
        raise EmbedError(f"--index {args.index[0]} does not record its model; give --model")
    pretrained = args.pretrained if args.model else index.get("pretrained")
    adapter = args.adapter or (None if args.model else index.get("adapter"))
    device = default_device(args.device)
    model = load_model(spec, pretrained, device, adapter=adapter, names=MODEL_ARGS)
    for where, info in zip(args.index, shards):
        check_query_model(info, model, spec, f"--index {where}", args.allow_other_model, "--allow-other-model")
    with torch.inference_mode():
        if args.image:  # embedded as the index's images were (NaFlex: at the recorded sequence length)
            try:
                seq_len = check_seq_len(model, args.seq_len if args.seq_len is not None else index.get("seq_len"))
            except ValueError as e:
                raise EmbedError(str(e)) from None
            pre = image_transform(model, train=False, seq_len=seq_len)
            x = stack_images([pre(load_image(p)) for p in args.image]).to(device)
            return model.encode_image(x, normalize=True).float().cpu().numpy()
        return model.encode_text(get_tokenizer(model)(args.queries).to(device), normalize=True).float().cpu().numpy()


def _search_shard(directory: str) -> tuple[str, str, dict[str, Any] | None]:
    """(directory, the embed output it searches exactly, its ann.json when it is an `mm index build` output)."""
    if is_ann(directory):  # its ann.json names the embed output it was built from
        require_faiss("--index (an approximate index)")
        ann = read_ann(directory)
        return directory, ann["embeddings"], ann
    return directory, directory, None


@guard(EmbedError, BadSample, *MODEL_ERRORS)
def cmd_search(args: argparse.Namespace) -> int:
    if bool(args.queries) == bool(args.image):
        raise EmbedError("give query texts or --image PATH (one of them)")
    missing = [p for p in args.image or [] if not Path(p).is_file()]
    if missing:
        raise EmbedError(f"--image: no such file: {missing[0]}")
    if args.k < 1:
        raise EmbedError(f"-k must be >= 1, got {args.k}")
    if args.faiss:
        require_faiss("--faiss")
    shards = [_search_shard(d) for d in args.index]  # (directory, its embed output, ann.json or None)
    first = shards[0][2]["embed"] if shards[0][2] else read_index(shards[0][1])
    q = _embed_queries(first, args, [s[2]["embed"] if s[2] else read_index(s[1]) for s in shards])
    found = [ann_search(d, q, args.k) if ann and not args.exact else search(emb, q, args.k, use_faiss=args.faiss)
             for d, emb, ann in shards]
    scores, ids = found[0] if len(found) == 1 else merge_topk(found, args.k)
    for query, s, found in zip(args.image or args.queries, scores, ids):
        if args.json:
            print(json.dumps({"query": query, "results": [{"rank": r, "score": float(v), "id": i}
                                                          for r, (v, i) in enumerate(zip(s, found), 1)]}))
            continue
        print(f"query: {query}")
        for r, (v, i) in enumerate(zip(s, found), 1):
            print(f"{r}\t{v:.6f}\t{i}")
    if args.plot:
        queries = [(load_image(p), f"query: {Path(p).name}") for p in args.image] if args.image else list(args.queries)
        print(f"wrote {plot_results([s[1] for s in shards], queries, scores, ids, args.plot)}", file=sys.stderr)
    return 0


def add_search_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "search", help="nearest neighbours of texts or images in an `mm embed` output",
        description="Exact cosine top-k over an `mm embed` output directory, streamed part by part, or approximate "
                    "through an `mm index build` output (--exact: exact over its embeddings). Prints "
                    "rank<TAB>score<TAB>id per result.\n\nexamples:\n"
                    "  mm search --index emb/photos 'a dog on a beach' 'a red car' -k 5\n"
                    "  mm search --index emb/captions --image query.jpg\n"
                    "  mm search --index emb/photos --model finetuned/ 'a dog' --allow-other-model --json\n"
                    "  mm search --index emb/photos 'a red circle' 'a blue star' -k 8 --plot search.png\n"
                    "  mm search --index ann/photos 'a dog on a beach'   (an `mm index build` output; --exact to compare)",
        formatter_class=EXAMPLES)
    s.add_argument("queries", nargs="*", metavar="QUERY_TEXT", help="query texts")
    s.add_argument("--image", nargs="+", metavar="PATH", help="query images instead of texts")
    s.add_argument("--index", required=True, action="append", metavar="DIR",
                   help="an `mm embed` output directory, or an `mm index build` output (approximate search through "
                   "its faiss index); repeat it to search several shards as one (the best k of all, each id once)")
    s.add_argument("--exact", action="store_true", help="with an `mm index build` output: exact search over the "
                   "embeddings it was built from instead")
    s.add_argument("-k", type=int, default=10, help="results per query")
    add_model_options(s, required=False, model_help=f"default: the model recorded in the index. {MODEL_HELP}",
                      pretrained_help="weights file for a preset --model",
                      adapter_help="a LoRA adapter directory on the query model (default: the one the index "
                                   "records, unless --model is given)")
    s.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    s.add_argument("--allow-other-model", action="store_true", help="query with a --model other than the one that "
                   "made the index (refused by default: its weights fingerprint differs, so the scores compare two "
                   "models' embeddings)")
    s.add_argument("--faiss", action="store_true", help="score blocks with faiss (must be installed)")
    s.add_argument("--json", action="store_true", help="one JSON line per query {query, results: [{rank, score, id}]}")
    s.add_argument("--plot", metavar="PNG", help="also draw each query and its results (images or texts) to this PNG")
    add_seq_len(s, "NaFlex: image queries at their own aspect ratio in at most N patches (default: as the index's "
                   "images were)")
    s.set_defaults(fn=cmd_search)
    return s
