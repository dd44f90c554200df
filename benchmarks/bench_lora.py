"""LoRA vs the other ways of adapting a pretrained model, on real data (issue 19).

Stage ``pretrain``: tiny-clip (64 px / patch 8) trained by mm on Flickr8k (never sees a CIFAR label).
Stage ``adapt``: the same CIFAR-10 steps and data from that model for: frozen (zero-shot), LiT (image tower
locked), LoRA rank 4 / 8 / 16 (attention + MLP of both towers) and full fine-tuning; each run is its own process
(peak RSS of the process = peak memory); reported: CIFAR-10 zero-shot top-1 / top-5 on 2,000 test images, trainable
parameters, optimizer-state bytes, peak RSS, step time (median), checkpoint and final/ sizes.
Stage ``memory``: a ViT-B-16-sized CLIP (random weights) at one batch size, full fine-tuning vs LoRA: peak RSS and
step time of a few training steps on random data (CPU here; on a GPU the CUDA peak).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_lora.py pretrain
    .venv/bin/python benchmarks/bench_lora.py adapt          # table as JSON lines + markdown
    .venv/bin/python benchmarks/bench_lora.py memory --batch 16
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
OUT = ROOT / "benchmarks" / "runs" / "lora"
TEMPLATES = ROOT / "benchmarks" / "cifar10_zeroshot_templates.txt"
SIZE = ["model.vision.image_size=64", "model.vision.patch_size=8"]

METHODS = {
    "lit": ["train.freeze=[vision]", "train.lr=3e-4"],
    "lora4": ["train.lora.rank=4", "train.lora.alpha=8", "train.lora.targets=[*.attn, *.mlp]", "train.lr=2e-3"],
    "lora8": ["train.lora.rank=8", "train.lora.alpha=16", "train.lora.targets=[*.attn, *.mlp]", "train.lr=2e-3"],
    "lora16": ["train.lora.rank=16", "train.lora.alpha=32", "train.lora.targets=[*.attn, *.mlp]", "train.lr=2e-3"],
    "full": ["train.lr=3e-4"],
}


def child_train(overrides: list[str], report: Path) -> None:
    """Run one training in this process; write its results, peak RSS and trainable parameters to ``report``."""
    from mm.train.preflight import load_run_config
    from mm.train.trainer import Trainer

    cfg = load_run_config(None, overrides)
    trainer = Trainer(cfg)
    trainer.resume()
    results = trainer.train()
    n_train = sum(p.numel() for p in trainer.core.parameters() if p.requires_grad)
    n_all = sum(p.numel() for n, p in trainer.core.named_parameters() if ".lora_" not in n)
    opt_bytes = sum(t.numel() * t.element_size() for st in trainer.opt.state.values() for t in st.values()
                    if hasattr(t, "numel"))
    report.write_text(json.dumps({"results": results, "trainable": n_train, "base_params": n_all,
                                  "optimizer_state_bytes": opt_bytes,
                                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(overrides: list[str], report: Path) -> dict:
    cmd = [sys.executable, __file__, "child", "--report", str(report), "--", *overrides]
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True)
    out = json.loads(report.read_text())
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def common(out: Path, steps: int, batch: int) -> list[str]:
    return [*SIZE, f"data.batch_size={batch}", "data.workers=2", "data.shuffle_buffer=2000",
            f"train.steps={steps}", f"train.warmup_steps={max(1, steps // 10)}", "train.weight_decay=0.1",
            "train.grad_clip=null", "train.checkpoint_every=0", "train.resume=none", "train.log_every=10",
            "eval.batch_size=250", f"output_dir={out}"]


def pretrain(a) -> None:
    out = OUT / "pretrain_flickr8k"
    ov = ["model=tiny-clip", f"data.train={DATA}/flickr8k/train-{{0000..0003}}.tar", "train.lr=1e-3",
          *common(out, a.steps, a.batch)]
    r = run_child(ov, OUT / "pretrain.json")
    print(json.dumps({"pretrain": str(out / "final"), **r}))


def zero_shot(model: str, n: int) -> dict:
    cmd = [sys.executable, "-m", "mm", "eval", "--model", model, "--zeroshot", f"{DATA}/cifar10/test-0000.tar.gz",
           "--templates", str(TEMPLATES), "--max-samples", str(n)]
    proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(proc.stdout)


def median_step_s(run_dir: Path, batch: int) -> float:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r][1:]  # the first window includes start-up
    return batch / statistics.median(rates)


def adapt(a) -> None:
    base = OUT / "pretrain_flickr8k" / "final"
    rows = []
    zs = zero_shot(str(base), a.test)
    rows.append({"method": "frozen", "top1": zs.get("zeroshot_top1"), "top5": zs.get("zeroshot_top5"),
                 "trainable": 0})
    print(json.dumps(rows[-1]), flush=True)
    for name in a.methods:
        out = OUT / f"adapt_{name}"
        ov = [f"train.init_from={base}", f"data.train={DATA}/cifar10/train-0000.tar.gz",
              *common(out, a.steps, a.batch), *METHODS[name]]
        r = run_child(ov, OUT / f"adapt_{name}.json")
        zs = zero_shot(str(out / "final"), a.test)
        ckpt = max((out / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
        rows.append({"method": name, "top1": zs.get("zeroshot_top1"), "top5": zs.get("zeroshot_top5"),
                     "trainable": r["trainable"], "trainable_pct": round(100 * r["trainable"] / r["base_params"], 2),
                     "optimizer_state_mb": round(r["optimizer_state_bytes"] / 2**20, 2),
                     "peak_rss_mb": round(r["peak_rss_mb"]), "step_s": round(median_step_s(out, a.batch), 3),
                     "checkpoint_mb": round(dir_bytes(ckpt) / 2**20, 2),
                     "final_mb": round(dir_bytes(out / "final") / 2**20, 2), "wall_s": r["wall_s"]})
        print(json.dumps(rows[-1]), flush=True)
    (OUT / "adapt_table.json").write_text(json.dumps(rows, indent=1))
    frozen, full = rows[0]["top1"], next((r["top1"] for r in rows if r["method"] == "full"), None)
    for r in rows:
        gain = "" if full is None or full == frozen or r["method"] == "frozen" else \
            f"{100 * (r['top1'] - frozen) / (full - frozen):.0f}%"
        print(f"| {r['method']} | {100 * r['top1']:.2f}% | {100 * r['top5']:.2f}% | {gain} | {r['trainable']:,} "
              f"({r.get('trainable_pct', 0)}%) | {r.get('optimizer_state_mb', 0)} | {r.get('peak_rss_mb', '')} | "
              f"{r.get('step_s', '')} | {r.get('checkpoint_mb', '')} | {r.get('final_mb', '')} |")


def memory_child(a) -> None:
    """A few training steps of a ViT-B-16 CLIP on random data, full or LoRA; prints peak memory and step time."""
    import torch

    import mm
    from mm.layers.config import LoraConfig
    from mm.layers.lora import add_lora, mark_only_lora_trainable
    from mm.losses import ClipLoss

    dev = torch.device(a.device)
    torch.manual_seed(0)
    model = mm.create_model("ViT-B-16").to(dev)
    if a.mode != "full":
        add_lora(model, LoraConfig(rank=int(a.mode.removeprefix("lora")), alpha=16, targets=["*.attn", "*.mlp"]))
        mark_only_lora_trainable(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=dev.type == "cuda", foreach=dev.type != "cuda")
    loss_fn = ClipLoss()
    images = torch.randn(a.batch, 3, 224, 224, device=dev)
    tokens = torch.randint(1, 49000, (a.batch, 77), device=dev)
    tokens[:, 0], tokens[:, 20], tokens[:, 21:] = 49406, 49407, 0
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.bf16):
            out = model(images, tokens)
            loss = loss_fn(out)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps({"mode": a.mode, "batch": a.batch, "device": a.device, "bf16": a.bf16,
                      "trainable": sum(p.numel() for p in params),
                      "total": sum(p.numel() for p in model.parameters()),
                      "peak_mb": round(peak), "step_s": round(statistics.median(times[1:] or times), 3)}))


def memory(a) -> None:
    for mode in ("full", "lora8"):
        cmd = [sys.executable, __file__, "memory-child", "--mode", mode, "--batch", str(a.batch), "--steps",
               str(a.steps), "--device", a.device, *(["--bf16"] if a.bf16 else [])]
        subprocess.run(cmd, cwd=ROOT, check=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    s = sub.add_parser("pretrain")
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--batch", type=int, default=128)
    s = sub.add_parser("adapt")
    s.add_argument("--steps", type=int, default=150)
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--test", type=int, default=2000)
    s.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    for name in ("memory", "memory-child"):
        s = sub.add_parser(name)
        s.add_argument("--batch", type=int, default=16)
        s.add_argument("--steps", type=int, default=3)
        s.add_argument("--device", default="cpu")
        s.add_argument("--bf16", action="store_true")
        s.add_argument("--mode", default="full")
    s = sub.add_parser("child")
    s.add_argument("--report", required=True)
    s.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)
    OUT.mkdir(parents=True, exist_ok=True)
    if a.stage == "child":
        child_train(a.overrides, Path(a.report))
    else:
        {"pretrain": pretrain, "adapt": adapt, "memory": memory, "memory-child": memory_child}[a.stage](a)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
