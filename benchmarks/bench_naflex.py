"""NaFlex benchmarks (docs/benchmarks.md, "NaFlex").

``score``: the runs of benchmarks/run_naflex.sh (NaFlex, squash, centre crop; the same model, steps and patch positions
per step), each final model read in its own preprocessing on the built-in mixed-aspect set's held-out split:
zero-shot top-1 over the 30 classes, overall and by the image's aspect ratio (read from each sample's json).

``speed``: the image tower's training step (forward + backward) on the same number of patch positions per batch, in
one process: square images (B x grid^2) against NaFlex Patches of square images (no padding: the cost of the
NaFlex path itself) and of mixed-aspect images at one sequence length (padding as the mixed-aspect set gives it).
Reports positions/s, real patches/s and their ratios to the square path (a CPU ratio; absolute figures from a GPU).

    python benchmarks/bench_naflex.py score [--runs benchmarks/runs/naflex] [--data data/aspect]
    python benchmarks/bench_naflex.py speed [--model tiny-clip] [--batch 128] [--repeats 10] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch

import mm
from mm.data.transforms import naflex_size
from mm.eval.classify import resolve_shards
from mm.eval.config import ShardReading
from mm.eval.runner import eval_batches
from mm.eval.zeroshot import zero_shot_classifier
from mm.models.patches import Patches, patchify, square_patches
from mm.utils.precision import autocast

RUNS = {"naflex": 64, "squash": None, "crop": None}  # run -> its evaluation's sequence length (None: square)


def score(args: argparse.Namespace) -> None:
    runs, data = Path(args.runs), Path(args.data)
    urls, classnames, templates = resolve_shards(f"{data}/test-{{000000..000001}}.tar.gz", None, None, "data")
    results = {}
    for name, seq_len in RUNS.items():
        final = runs / name / "final"
        if not final.is_dir():
            print(f"{name}: no final model in {final}, skipped")
            continue
        model = mm.load_pretrained(final).eval()
        classifier = zero_shot_classifier(model, mm.get_tokenizer(model), classnames, templates)
        hits, counts = defaultdict(int), defaultdict(int)
        t0 = time.perf_counter()
        with torch.no_grad():
            for b in eval_batches(model, urls, ("label", "info"), batch_size=250,
                                  reading=ShardReading(workers=args.workers, seq_len=seq_len)):
                pred = (model.encode_image(b["images"], normalize=True) @ classifier).argmax(1)
                for ok, info in zip((pred == b["labels"]).tolist(), b["infos"]):
                    a = info["aspect"]
                    key = "1:1" if a == 1 else (f"{a:g}:1" if a > 1 else f"1:{1 / a:g}")
                    hits[key] += ok
                    counts[key] += 1
        recs = [json.loads(x) for x in (runs / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r for r in recs if "tokens_per_s" in r][1:]  # the first record holds the start-up
        results[name] = {
            "top1": sum(hits.values()) / sum(counts.values()), "n": sum(counts.values()),
            "by_aspect": {k: hits[k] / counts[k] for k in sorted(counts, key=_aspect_order)},
            "train_tokens_per_s": sum(r["tokens_per_s"] for r in steps) / max(1, len(steps)),
            "train_padding": sum(r["padding"] for r in steps) / max(1, len(steps)),
            "final_loss": [r for r in recs if "loss" in r][-1]["loss"], "eval_s": time.perf_counter() - t0}
        print(name, json.dumps(results[name]), flush=True)
    (runs / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    keys = sorted({k for r in results.values() for k in r["by_aspect"]}, key=_aspect_order)
    print("\n| run | top-1 | " + " | ".join(keys) + " | patches/s (train) | padding |")
    print("|---" * (len(keys) + 4) + "|")
    for name, r in results.items():
        print(f"| {name} | {r['top1']:.3f} | " + " | ".join(f"{r['by_aspect'][k]:.3f}" for k in keys)
              + f" | {r['train_tokens_per_s']:.0f} | {r['train_padding']:.3f} |")


def _aspect_order(key: str) -> float:
    a, b = key.split(":")
    return float(a) / float(b)


def _mixed(batch: int, patch: int, seq_len: int, seed: int) -> Patches:
    """``batch`` random images at the mixed-aspect set's ratios (1:4 ... 4:1), cut to at most ``seq_len`` patches."""
    rng = random.Random(seed)
    items = []
    for _ in range(batch):
        a = rng.choice([0.25, 0.5, 1.0, 2.0, 4.0])
        w, h = (128, round(128 / a)) if a >= 1 else (round(128 * a), 128)
        th, tw = naflex_size(h, w, patch, seq_len)
        items.append(patchify(torch.randn(3, th, tw), patch))
    return Patches.stack(items, length=seq_len)


def _step(tower, x, device: torch.device, precision: str) -> float:
    """Seconds of one forward + backward of the image tower."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with autocast(device, precision):
        out = tower(x)
    out.emb.float().square().mean().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _step_times(tower, inputs: dict, repeats: int, device: torch.device, precision: str) -> dict[str, float]:
    """The median step time of each input, measured in interleaved rounds (one step of each input per round, after
    two warm-up rounds), so that a machine's drift and neighbours' load fall on every input alike."""
    times: dict[str, list[float]] = {name: [] for name in inputs}
    for r in range(repeats + 2):
        for name, x in inputs.items():
            t = _step(tower, x, device, precision)
            if r >= 2:
                times[name].append(t)
    return {name: sorted(ts)[len(ts) // 2] for name, ts in times.items()}


def speed(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = mm.create_model(args.model).to(device).train()
    v = model.config.vision
    tower, seq_len = model.vision, v.grid ** 2
    square = torch.randn(args.batch, 3, v.image_size, v.image_size, device=device)
    inputs = {"square": square, "naflex, square images": square_patches(square.cpu(), v.patch_size).to(device),
              "naflex, mixed aspect": _mixed(args.batch, v.patch_size, seq_len, 0).to(device)}
    rows = {}
    medians = _step_times(tower, inputs, args.repeats, device, "bf16" if args.bf16 else "fp32")
    for name, x in inputs.items():
        s = medians[name]
        positions = args.batch * seq_len
        real = int(x.lengths().sum()) if isinstance(x, Patches) else positions
        rows[name] = {"s_per_step": s, "positions_per_s": positions / s, "patches_per_s": real / s,
                      "padding": 1 - real / positions}
    base = rows["square"]["positions_per_s"]
    print(f"{args.model} image tower, forward + backward, batch {args.batch} x {seq_len} positions, {device}, "
          f"{'bf16' if args.bf16 else 'fp32'}:")
    print("| input | padding | positions/s | real patches/s | positions/s vs square |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['padding']:.3f} | {r['positions_per_s']:.0f} | {r['patches_per_s']:.0f} | "
              f"{r['positions_per_s'] / base:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("score")
    s.add_argument("--runs", default="benchmarks/runs/naflex")
    s.add_argument("--data", default="data/aspect")
    s.add_argument("--workers", type=int, default=1)
    p = sub.add_parser("speed")
    p.add_argument("--model", default="tiny-clip")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20, help="interleaved rounds measured (after two warm-up rounds)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (default: fp32)")
    args = ap.parse_args()
    score(args) if args.cmd == "score" else speed(args)


if __name__ == "__main__":
    main()
