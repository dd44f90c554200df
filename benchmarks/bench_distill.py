"""Distillation on CIFAR-10: micro-clip trained alone vs distilled from a tiny-clip teacher, same steps and data.

    OMP_NUM_THREADS=1 python benchmarks/bench_distill.py
    OMP_NUM_THREADS=1 python benchmarks/bench_distill.py --teacher runs/my_teacher/final train.steps=200

1. The teacher's embeddings, once: ``mm embed --images`` over the training shards (ids = shard keys) and
   ``mm embed --texts`` over the distinct training captions (read from the shards' ``txt``).
2. ``benchmarks/configs/cifar10_micro_clip.yaml`` (no teacher) and ``cifar10_micro_clip_distill.yaml`` (the same
   plus the ``distill`` section), each a ``train.py`` process; extra ``key=value`` arguments go to both.
3. Zero-shot top-1 / top-5 on the 10,000 test images (10 templates not used in training) from each run's final
   evaluation, training-loop time, and the one-off embedding time, into ``benchmarks/runs/distill/results.json``.

Run from the repository root (the configs' paths are relative to it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"
OUT = ROOT / "benchmarks" / "runs" / "distill"
CONFIGS = {"baseline": "cifar10_micro_clip.yaml", "distilled": "cifar10_micro_clip_distill.yaml"}


def sh(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    print("+", " ".join(cmd), flush=True)
    threads = os.environ.get("OMP_NUM_THREADS", "1")
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": threads})
    return time.perf_counter() - t0


def teacher_embeddings(teacher: str, workers: int) -> dict[str, float]:
    """Embed the training images and captions with the teacher (skipped when already there)."""
    from mm.data.wds import iter_shard

    times = {}
    for kind in ("images", "texts"):
        index = OUT / f"teacher_{kind}" / "index.json"
        if index.is_file() and json.loads(index.read_text())["model"] != str(Path(teacher).resolve()):
            sys.exit(f"{index.parent} holds another teacher's embeddings; delete it to embed with {teacher}")
    mm_cli = [sys.executable, "-m", "mm.cli"]
    if not (OUT / "teacher_images" / "index.json").is_file():
        times["embed_images_s"] = sh(mm_cli + ["embed", "--model", teacher, "--images",
                                               str(CIFAR / "train-{0000..0004}.tar.gz"), "--out",
                                               str(OUT / "teacher_images"), "--batch-size", "500", "--workers",
                                               str(workers)])
    if not (OUT / "teacher_texts" / "index.json").is_file():
        t0 = time.perf_counter()
        captions = sorted({s["txt"].decode().strip() for i in range(5)
                           for s in iter_shard(str(CIFAR / f"train-{i:04d}.tar.gz"), print)})
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "captions.json").write_text(json.dumps(captions))
        times["embed_texts_s"] = time.perf_counter() - t0 + sh(
            mm_cli + ["embed", "--model", teacher, "--texts", str(OUT / "captions.json"), "--out",
                      str(OUT / "teacher_texts"), "--workers", "0"])
    return times


def final_eval(run: Path) -> dict:
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in recs if "zeroshot_top1" in r][-1]
    stats = [r for r in recs if "samples_per_s" in r]
    return {"top1": 100 * ev["zeroshot_top1"], "top5": 100 * ev["zeroshot_top5"], "steps": stats[-1]["step"],
            "final_loss": stats[-1]["loss"], "kl_loss": stats[-1].get("kl_loss")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="benchmarks/runs/learning-run1/mm/final", help="mm model directory")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", choices=sorted(CONFIGS), help="run one of the two")
    p.add_argument("overrides", nargs="*", help="key=value for both runs, e.g. train.steps=200")
    args = p.parse_args()
    results: dict = {"teacher": args.teacher, "overrides": args.overrides,
                     "threads": int(os.environ.get("OMP_NUM_THREADS", "1"))}
    results.update(teacher_embeddings(args.teacher, args.workers))
    for name, config in CONFIGS.items():
        if args.only and name != args.only:
            continue
        run = OUT / name
        secs = sh([sys.executable, "train.py", f"benchmarks/configs/{config}", *args.overrides])
        results[name] = {"process_s": round(secs, 1), **final_eval(run),
                         "command": f"OMP_NUM_THREADS=1 python train.py benchmarks/configs/{config} "
                                    + " ".join(args.overrides)}
    old = json.loads((OUT / "results.json").read_text()) if (OUT / "results.json").is_file() else {}
    old.update(results)
    (OUT / "results.json").write_text(json.dumps(old, indent=1))
    print(json.dumps(old, indent=1))
    if "baseline" in old and "distilled" in old:
        print("\n| student | zero-shot top-1 | top-5 | wall time (process) |\n| --- | --- | --- | --- |")
        for name in CONFIGS:
            r = old[name]
            print(f"| {name} | {r['top1']:.2f}% | {r['top5']:.2f}% | {r['process_s']:.0f} s |")


if __name__ == "__main__":
    main()
