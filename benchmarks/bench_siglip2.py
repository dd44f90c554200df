"""Score the SigLIP 2 comparison's runs (benchmarks/run_siglip2.sh): for each run's final model, on the built-in
scenes' held-out split,

- zero-shot classification of the main object (30 classes; the run's own final evaluation, metrics.jsonl),
- referring-expression accuracy: each region's caption grounded by the decoder, IoU > 0.5 with its box
  (mm.eval.grounding; a model without a decoder has none),
- a dense probe: a linear layer on the frozen patch features predicting each patch's class (background or one of
  the five shapes), fitted on training patches, mean IoU on held-out patches (mm.eval.dense).

    python benchmarks/bench_siglip2.py [--runs benchmarks/runs/siglip2] [--data data/scenes]

Writes RUNS/results.json and prints a Markdown table (docs/benchmarks.md holds the measured one).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import mm
from mm.eval.dense import dense_probe
from mm.eval.grounding import referring_accuracy

RUNS = ("untrained", "siglip", "decoder", "recipe", "referring")
LABELS = {"untrained": "untrained (random init, the probe's floor)", "siglip": "SigLIP (sigmoid loss only)",
          "decoder": "+ LocCa decoder", "recipe": "+ decoder + self-distillation + masked prediction",
          "referring": "(check) + LocCa decoder, referring task only"}


def final_eval(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in recs if "zeroshot_top1" in r]
    steps = [r for r in recs if "samples_per_s" in r]
    return {"zeroshot_top1": evals[-1]["zeroshot_top1"] if evals else None,
            "samples_per_s": sum(r["samples_per_s"] for r in steps[1:]) / max(len(steps) - 1, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", default="benchmarks/runs/siglip2")
    ap.add_argument("--data", default="data/scenes")
    ap.add_argument("--max-test", type=int, default=1000, help="held-out scenes for referring (all regions of each)")
    ap.add_argument("--probe-train", type=int, default=1000, help="training images for the dense probe")
    ap.add_argument("--probe-test", type=int, default=500, help="held-out images for the dense probe")
    ap.add_argument("--only", nargs="*", default=list(RUNS), help=f"runs to score, of {', '.join(RUNS)}")
    args = ap.parse_args()
    torch.manual_seed(0)
    runs, data = Path(args.runs), Path(args.data)
    train, test = f"{data}/train-{{000000..000001}}.tar.gz", f"{data}/test-{{000000..000001}}.tar.gz"
    out = runs / "results.json"
    results = json.loads(out.read_text()) if out.is_file() else {}  # scored earlier, kept unless rescored
    for name in [r for r in RUNS if r in args.only]:
        run = runs / name
        if name == "untrained":
            model, row = mm.create_model("tiny-siglip2").eval(), {"zeroshot_top1": None, "samples_per_s": None}
        elif not (run / "final").is_dir():
            print(f"{name}: no final model in {run}, skipped")
            continue
        else:
            model, row = mm.load_model(str(run / "final")), final_eval(run)
        t0 = time.time()
        if model.config.decoder is not None:
            r = referring_accuracy(model, mm.get_tokenizer(model), test, max_samples=args.max_test)
            row.update(referring_acc=r["referring_acc"], referring_miou=r["referring_miou"], regions=r["regions"])
        d = dense_probe(model, train, test, max_train=args.probe_train, max_test=args.probe_test)
        row.update(dense_miou=d["dense_miou"], dense_acc=d["dense_acc"], dense_iou=d["dense_iou"])
        row["eval_s"] = time.time() - t0
        results[name] = row
        print(name, {k: v for k, v in row.items() if k != "dense_iou"}, flush=True)
    results = {k: results[k] for k in RUNS if k in results}
    out.write_text(json.dumps(results, indent=1))
    print("\n| run | zero-shot top-1 | referring acc (IoU > 0.5) | referring mean IoU | dense probe mIoU | "
          "patch acc |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        ref = f"{r['referring_acc']:.3f} | {r['referring_miou']:.3f}" if "referring_acc" in r else "n/a | n/a"
        zs = f"{r['zeroshot_top1']:.3f}" if r["zeroshot_top1"] is not None else "n/a"
        print(f"| {LABELS[name]} | {zs} | {ref} | {r['dense_miou']:.3f} | {r['dense_acc']:.3f} |")


if __name__ == "__main__":
    main()
