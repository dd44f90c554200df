"""`mm benchmark` against LAION clip_benchmark itself: both tools, each as a fresh process (what a user runs), on
the same model and the same clip_benchmark-layout webdatasets; wall time of each and the metrics side by side.

The data are real: CIFAR-10's 10,000 test images (zero-shot classification, clip_benchmark's own CIFAR-10 prompts)
and Flickr8k's 1,000 test images with their five captions each (retrieval), from ../shared/datasets, rewritten
into clip_benchmark's layout under --work. The model is an open_clip architecture with random weights saved to a
file (no network here; speed does not depend on the weights, and the metrics must agree whatever they are).

    make test-benchmark   # once: clip_benchmark 1.6.2 in .venv-clip-benchmark (it needs numpy < 2.3)
    python benchmarks/bench_benchmark.py                       # ViT-S-32, batch 64, 2 loader workers
    python benchmarks/bench_benchmark.py --model ViT-B-32 --device cuda

Prints a Markdown table (tool, dataset, wall s, metrics) and the largest metric difference.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "datasets"


def _members(path: Path):
    """(key, {ext: bytes}) of a webdataset shard, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if m.isfile():
                key, ext = m.name.split("/")[-1].split(".", 1)
                samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples.items()


def _write(dst: Path, samples: list[tuple[str, dict[str, bytes]]], shards: int) -> None:
    (dst / "test").mkdir(parents=True, exist_ok=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        with tarfile.open(dst / "test" / f"{s}.tar", "w") as tar:
            for key, files in samples[s * per:(s + 1) * per]:
                for ext, data in files.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (dst / "test" / "nshards.txt").write_text(f"{shards}\n")


def build_data(work: Path) -> Path:
    """clip_benchmark-layout copies of CIFAR-10 test and Flickr8k test under work/wds (once)."""
    root = work / "wds"
    cifar, flickr = root / "cifar10", root / "flickr8k"
    if not (cifar / "classnames.txt").is_file():
        info = json.loads((SHARED / "cifar10" / "info.json").read_text())
        samples = [(k, {"jpg": f["jpg"], "cls": f["cls"]}) for k, f in _members(SHARED / "cifar10" / "test-0000.tar.gz")]
        _write(cifar, samples, shards=4)
        templates = json.loads((ROOT / ".venv-clip-benchmark" / "clip_benchmark" / "datasets" /
                                "en_zeroshot_classification_templates.json").read_text())["cifar10"]
        (cifar / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
        (cifar / "classnames.txt").write_text("\n".join(info["classes"]) + "\n")
    if not (flickr / "dataset_type.txt").is_file():
        samples = []
        for k, f in _members(SHARED / "flickr8k" / "test-0000.tar"):
            caps = json.loads(f["json"])["captions"]
            samples.append((k, {"jpg": f["jpg"], "txt": "\n".join(c.replace("\n", " ") for c in caps).encode()}))
        _write(flickr, samples, shards=2)
        (flickr / "dataset_type.txt").write_text("retrieval\n")
    return root


def run(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"failed: {' '.join(cmd[:4])} ...\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ViT-S-32", help="an open_clip architecture (random weights)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="mm's; clip_benchmark takes CUDA whenever there is one")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "runs" / "bench_benchmark"))
    p.add_argument("--clip-benchmark-path", default=str(ROOT / ".venv-clip-benchmark"))
    args = p.parse_args()
    work = Path(args.work)
    root = build_data(work)
    import open_clip
    import torch

    weights = work / f"{args.model}_random.pt"
    if not weights.is_file():
        torch.manual_seed(0)
        torch.save(open_clip.create_model(args.model).state_dict(), weights)
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.clip_benchmark_path)}
    rows, diffs = [], []
    for dataset, task in (("wds/cifar10", "zeroshot_classification"), ("wds/flickr8k", "zeroshot_retrieval")):
        outs = {tool: work / "out" / tool for tool in ("clip_benchmark", "mm")}
        for d in outs.values():
            d.mkdir(parents=True, exist_ok=True)
            for f in d.glob(f"{dataset.split('/')[1]}_*.json"):
                f.unlink()
        common = ["--dataset", dataset, "--task", task]
        t_cb = run([sys.executable, "-m", "clip_benchmark.cli", "eval", "--model", args.model, "--pretrained",
                    str(weights), *common, "--dataset_root", f"{root}/{{dataset}}", "--recall_k", "1", "5", "10",
                    "--batch_size", str(args.batch), "--num_workers", str(args.workers), "--no_amp",
                    "--output",
                    f"{outs['clip_benchmark']}/{{dataset}}_{{pretrained}}_{{model}}_{{language}}_{{task}}.json"], env)
        t_mm = run([sys.executable, "-m", "mm", "benchmark", "--model", args.model, "--pretrained", str(weights),
                    *common, "--dataset-root", f"{root}/{{dataset}}", "--batch-size", str(args.batch),
                    "--workers", str(args.workers), "--device", args.device, "--output", str(outs["mm"])])
        got = {}
        for tool, d in outs.items():
            (f,) = d.glob(f"{dataset.split('/')[1]}_*.json")
            got[tool] = json.loads(f.read_text())["metrics"]
        for k, v in got["mm"].items():
            diffs.append(abs(v - got["clip_benchmark"][k]))
        rows.append((dataset, task, t_cb, t_mm, got))
    print(f"\n{args.model} (random weights), batch {args.batch}, {args.workers} workers, {args.device}, fp32\n")
    print("| dataset | task | clip_benchmark wall s | mm benchmark wall s | clip_benchmark / mm | metrics (mm) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for dataset, task, t_cb, t_mm, got in rows:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in got["mm"].items() if not k.endswith("@5"))
        print(f"| {dataset} | {task} | {t_cb:.1f} | {t_mm:.1f} | {t_cb / t_mm:.2f}x | {shown} |")
    print(f"\nlargest metric difference between the two tools: {max(diffs):.2e}")


if __name__ == "__main__":
    main()
