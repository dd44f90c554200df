"""Gradient caching (issue 20): memory and step time against the batch, and what a larger batch buys in learning.

Stage ``memory``: one model at several global batches (one process), each as its own child process (peak RSS of
the process on the CPU; ``torch.cuda.max_memory_allocated`` on a GPU) for a few AdamW training steps on random
data: without caching (one forward / backward over the batch) and with ``train.grad_cache_chunk`` (the trainer's
:class:`mm.train.grad_cache.GradCache`). Reported: peak memory, its ratio to the uncached run at batch = chunk,
median step time, and the cached step's split (graph-free first pass / batch loss / second pass).
Stage ``learning``: tiny-clip on CIFAR-10 (shared data), the same samples seen at batch 256 and at batch 2048
through caching (chunk 256), zero-shot top-1 / top-5 on 2,000 test images.

    .venv/bin/python benchmarks/bench_grad_cache.py memory --model tiny-clip --batches 256 1024 4096 --chunk 256 \\
        --plain-max 1024 --steps 2                            # uncached 4096 does not fit 23 GB
    .venv/bin/python benchmarks/bench_grad_cache.py memory --model ViT-B-32 --batches 256 1024 4096 --chunk 256 \\
        --plain-max 1024 --steps 1                            # uncached 1024 is killed on 23 GB: recorded
    .venv/bin/python benchmarks/bench_grad_cache.py memory --model ViT-B-16 --batches 1024 --chunk 256 \\
        --device cuda --bf16 --no-plain                       # a batch that does not fit uncached (GPU)
    .venv/bin/python benchmarks/bench_grad_cache.py learning
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets" / "cifar10"
OUT = ROOT / "benchmarks" / "runs" / "grad_cache"
TEMPLATES = ROOT / "benchmarks" / "cifar10_zeroshot_templates.txt"


def memory_child(a) -> None:
    """A few training steps of one configuration; prints one JSON line."""
    import torch

    import mm
    from mm.losses import ClipLoss
    from mm.train.grad_cache import GradCache

    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = mm.create_model(a.model).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda", foreach=dev.type != "cuda")
    loss_fn = ClipLoss()
    size, text = model.config.vision.image_size, model.config.text
    images = torch.randn(a.batch, 3, size, size, device=dev)
    tokens = torch.randint(1, text.vocab_size - 2, (a.batch, text.context_length), device=dev)
    tokens[:, 0], tokens[:, 12], tokens[:, 13:] = text.vocab_size - 2, text.eot_id, text.pad_id

    def autocast():
        return torch.autocast(dev.type, dtype=torch.bfloat16) if a.bf16 else nullcontext()

    gc = GradCache(model, model, loss_fn, a.chunk, device=dev, autocast=autocast) if a.chunk else None
    # the process's peak before the first step (interpreter, torch, model, data): the steps' own memory is above it
    before = (torch.cuda.max_memory_allocated(dev) if dev.type == "cuda"
              else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2**20
    times, shares = [], []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        if gc is not None:
            gc.step(images, tokens)
        else:
            with autocast():
                out = model(images, tokens)
            loss_fn(out)["loss"].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if gc is not None:
            shares.append(gc.log_record(times[-1]))
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    step_s = statistics.median(times[1:] or times)  # the first step includes warm-up
    rec = {"model": a.model, "batch": a.batch, "chunk": a.chunk, "device": a.device, "bf16": a.bf16,
           "peak_mb": round(peak), "step_mb": round(peak - before), "step_s": round(step_s, 3),
           "samples_per_s": round(a.batch / step_s, 1)}
    if shares:
        last = shares[-1]
        rec.update({k: round(v, 3) for k, v in last.items() if k.endswith("_share")})
    print(json.dumps(rec), flush=True)


def memory(a) -> None:
    rows = []
    plain = [b for b in [a.chunk, *a.batches] if b >= a.chunk and (a.plain_max is None or b <= a.plain_max)]
    configs = [] if a.no_plain else [(b, 0) for b in plain]
    configs = list(dict.fromkeys(configs + [(b, a.chunk) for b in a.batches]))
    for batch, chunk in configs:
        cmd = [sys.executable, __file__, "memory-child", "--model", a.model, "--batch", str(batch), "--chunk",
               str(chunk), "--steps", str(a.steps), "--device", a.device, *(["--bf16"] if a.bf16 else [])]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:  # e.g. out of memory: recorded, the other configurations go on
            why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else f"exit {proc.returncode}"
            rows.append({"model": a.model, "batch": batch, "chunk": chunk,
                         "error": f"{why} {proc.stderr.strip()[-300:]}".strip()})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = next((r for r in rows if r["chunk"] == 0 and r["batch"] == a.chunk and "peak_mb" in r), None)
    print(f"\n| model | global batch | caching | peak memory (MB) | vs batch {a.chunk} uncached | the steps' own "
          f"(MB, above the peak before them) | vs batch {a.chunk} | step (s) | samples/s | "
          "first pass / loss / second pass |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        how = f"chunk {r['chunk']}" if r["chunk"] else "none"
        if "error" in r:
            print(f"| {r['model']} | {r['batch']} | {how} | failed: {r['error'][-80:]} | | | | | | |")
            continue
        ratio = f"{r['peak_mb'] / base['peak_mb']:.2f}x" if base else ""
        own = f"{r['step_mb'] / max(base['step_mb'], 1):.2f}x" if base else ""
        split = (f"{r['first_pass_share']:.0%} / {r['loss_share']:.0%} / {r['second_pass_share']:.0%}"
                 if "first_pass_share" in r else "")
        print(f"| {r['model']} | {r['batch']} | {how} | {r['peak_mb']:,} | {ratio} | {r['step_mb']:,} | {own} | "
              f"{r['step_s']} | "
              f"{r['samples_per_s']} | {split} |")


def learning(a) -> None:
    """The same samples at batch 256 (plain) and 2048 (grad caching, chunk 256); zero-shot after each."""
    samples = a.samples
    runs = {"b256": (256, None, a.lr), "b2048_cached": (2048, 256, a.lr * a.lr_scale_2048)}
    rows = []
    for name, (batch, chunk, lr) in runs.items():
        out = OUT / f"learning_{name}"
        steps = samples // batch
        ov = ["model=tiny-clip", f"data.train={DATA}/train-{{0000..0004}}.tar.gz", f"data.batch_size={batch}",
              "data.workers=2", "data.shuffle_buffer=2000", f"train.steps={steps}",
              f"train.warmup_steps={max(1, steps // 10)}", f"train.lr={lr}", "train.weight_decay=0.1",
              "train.grad_clip=null", "train.checkpoint_every=0", "train.resume=none",
              f"train.log_every={max(1, steps // 20)}", f"output_dir={out}",
              *([f"train.grad_cache_chunk={chunk}"] if chunk else [])]
        t0 = time.time()
        subprocess.run([sys.executable, str(ROOT / "train.py"), *ov], cwd=ROOT, check=True,
                       env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
        wall = time.time() - t0
        ev = subprocess.run([sys.executable, "-m", "mm", "eval", "--model", str(out / "final"), "--zeroshot",
                             f"{DATA}/test-0000.tar.gz", "--templates", str(TEMPLATES), "--max-samples",
                             str(a.test)], cwd=ROOT, check=True, capture_output=True, text=True)
        zs = json.loads(ev.stdout)
        rows.append({"run": name, "batch": batch, "chunk": chunk, "steps": steps, "lr": lr, "samples": steps * batch,
                     "top1": zs["zeroshot_top1"], "top5": zs["zeroshot_top5"], "wall_s": round(wall)})
        print(json.dumps(rows[-1]), flush=True)
    (OUT / "learning.json").write_text(json.dumps(rows, indent=1))
    print("\n| run | batch | caching | steps | lr | samples | zero-shot top-1 | top-5 | wall (s) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['batch']} | {r['chunk'] or 'none'} | {r['steps']} | {r['lr']:g} | {r['samples']:,} | "
              f"{100 * r['top1']:.2f}% | {100 * r['top5']:.2f}% | {r['wall_s']} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    for name in ("memory", "memory-child"):
        s = sub.add_parser(name)
        s.add_argument("--model", default="tiny-clip")
        s.add_argument("--steps", type=int, default=2)
        s.add_argument("--device", default="cpu")
        s.add_argument("--bf16", action="store_true")
        s.add_argument("--chunk", type=int, default=256)
        if name == "memory":
            s.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096])
            s.add_argument("--no-plain", action="store_true", help="only the cached runs (uncached would not fit)")
            s.add_argument("--plain-max", type=int, default=None,
                           help="uncached runs only up to this batch (larger ones would not fit this machine)")
        else:
            s.add_argument("--batch", type=int, required=True)
    s = sub.add_parser("learning")
    s.add_argument("--samples", type=int, default=24576, help="samples seen by each run (half an epoch)")
    s.add_argument("--lr", type=float, default=5e-4, help="at batch 256")
    s.add_argument("--lr-scale-2048", type=float, default=8 ** 0.5, help="lr multiplier at batch 2048 (sqrt rule)")
    s.add_argument("--test", type=int, default=2000)
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    {"memory": memory, "memory-child": memory_child, "learning": learning}[a.stage](a)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
