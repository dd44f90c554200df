"""Training-step throughput of mm vs open_clip, side by side in one process, same config and data.

    python benchmarks/bench_train.py --model tiny-clip --batch 64 --steps 20
    python benchmarks/bench_train.py --model ViT-B-32 --batch 8 --steps 6
    python benchmarks/bench_train.py --model tiny-coca --batch 64 --steps 10
    python benchmarks/bench_train.py --model ViT-B-16 --batch 256 --precision bf16 --compile --peak-tflops 793  # GPU

Both models get the same architecture (open_clip's own config for open_clip names; the equivalent
open_clip config for mm's tiny presets), the same random images and captions (``--caption-words``), AdamW,
and each package's own loss (CLIP, or CoCa with weights 1 / 2). Steps alternate between the two models so that machine noise hits both alike. Reports
samples/s, median step time, FLOPs per sample (counted with torch's FlopCounterMode), peak memory (CUDA:
the allocator's peak; CPU with --cpu-memory: peak resident-memory growth over the steps, each package in a
process of its own) and MFU (CUDA; needs --peak-tflops), each as mm / open_clip. Absolute numbers only mean something on a GPU.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import mm


def open_clip_model(name: str):
    """The open_clip model with the same shapes as mm preset ``name`` (its own registry config for open_clip
    names, else the equivalent config)."""
    import open_clip

    from mm.hub.open_clip import ConversionError, open_clip_config

    cfg = mm.get_preset(name)
    if name in open_clip.list_models():
        model = open_clip.create_model(name)
    else:
        try:
            kw = open_clip_config(cfg)
        except ConversionError as e:
            raise SystemExit(f"{name}: open_clip has no equivalent ({e})") from None
        model = open_clip.CoCa(**kw) if "multimodal_cfg" in kw else open_clip.CLIP(**kw)
    if cfg.decoder is not None:
        # open_clip leaves the CoCa decoder's output projection uninitialised (torch.empty)
        torch.nn.init.normal_(model.text_decoder.text_projection, std=cfg.decoder.transformer.width**-0.5)
        model.text.correct_cls_mask = cfg.text.cls_mask == "correct"
    return model


WORDS = ("dog cat man woman child ball grass water street red blue small large running sitting next to "
         "the a in on with near two three").split()


def captions(n: int, words: int) -> list[str]:
    """Deterministic captions of ``words`` words (Flickr8k's mean is about 12)."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(words)) for i in range(n)]


class Runner:
    def __init__(self, model, loss_fn, to_loss, args, device):
        self.model, self.loss_fn, self.to_loss, self.device = model.to(device).train(), loss_fn, to_loss, device
        # --compile: the whole forward through torch.compile (inductor) for both packages; FLOPs are still
        # counted on the eager module
        self.run_model = torch.compile(self.model) if args.compile else self.model
        fused = device.type == "cuda"
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
        self.times: list[float] = []

    def step(self, images, tokens) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.to_loss(self.run_model, self.loss_fn, images, tokens)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss

    def timed_step(self, images, tokens) -> None:
        sync(self.device)
        t0 = time.perf_counter()
        self.step(images, tokens)
        sync(self.device)
        self.times.append(time.perf_counter() - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mm_loss(model, loss_fn, images, tokens):
    return loss_fn(model(images, tokens))["loss"]


def oc_loss(model, loss_fn, images, tokens):
    out = model(images, tokens)
    if isinstance(out, dict):  # CoCa: open_clip's CoCaLoss returns (clip loss, caption loss), weighted
        return sum(loss_fn(**out))
    img, txt, scale = out[:3]
    return loss_fn(img, txt, scale)


def _proc_status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_peak_child(args) -> None:
    """Child process of --cpu-memory: one package's steps alone, printing the resident-memory growth from
    just before the first step to the peak (activations, gradients, optimizer state)."""
    import open_clip

    torch.manual_seed(0)
    device = torch.device("cpu")
    coca = mm.get_preset(args.model).decoder is not None
    if args.only == "mm":
        runner = Runner(mm.create_model(args.model), mm.CocaLoss() if coca else mm.ClipLoss(), mm_loss, args, device)
    else:
        loss = open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0) if coca else open_clip.loss.ClipLoss()
        runner = Runner(open_clip_model(args.model), loss, oc_loss, args, device)
    cfg = mm.get_preset(args.model)
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = mm.get_tokenizer(args.model)(captions(args.batch, args.caption_words))
    before = _proc_status_kib("VmRSS")
    for _ in range(3):
        runner.step(images, tokens)
    print(f"PEAK_GROWTH_MIB {(_proc_status_kib('VmHWM') - before) / 1024:.1f}")


def cpu_peaks(args) -> dict[str, float]:
    import subprocess
    import sys

    out = {}
    for name in ("mm", "open_clip"):
        cmd = [sys.executable, __file__, "--model", args.model, "--batch", str(args.batch), "--precision",
               args.precision, "--caption-words", str(args.caption_words), "--only", name]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[name] = float(res.stdout.split("PEAK_GROWTH_MIB")[1].split()[0]) / 1024
    return out


def count_flops(runner: Runner, images, tokens) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        runner.step(images, tokens)
    return fc.get_total_flops() / images.shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-clip")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU, e.g. 793 (H200 bf16)")
    p.add_argument("--caption-words", type=int, default=12, help="words per caption (Flickr8k: ~12)")
    p.add_argument("--compile", action="store_true", help="torch.compile both models' forward (warm-up compiles)")
    p.add_argument("--cpu-memory", action="store_true",
                   help="CPU: also measure each package's peak resident-memory growth, in a process of its own")
    p.add_argument("--only", choices=["mm", "open_clip"], help=argparse.SUPPRESS)  # --cpu-memory's children
    args = p.parse_args()
    if args.only:
        return cpu_peak_child(args)
    import open_clip

    device = torch.device(args.device)
    torch.manual_seed(0)
    coca = mm.get_preset(args.model).decoder is not None
    # both packages' default CoCa weights: contrastive 1, caption 2
    mm_loss_fn = mm.CocaLoss() if coca else mm.ClipLoss()
    oc_loss_fn = (open_clip.loss.CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0) if coca
                  else open_clip.loss.ClipLoss())
    ours = Runner(mm.create_model(args.model), mm_loss_fn, mm_loss, args, device)
    theirs = Runner(open_clip_model(args.model), oc_loss_fn, oc_loss, args, device)
    n_ours = sum(p.numel() for p in ours.model.parameters())
    n_theirs = sum(p.numel() for p in theirs.model.parameters())
    cfg = mm.get_preset(args.model)
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    tokens = mm.get_tokenizer(args.model)(captions(args.batch, args.caption_words)).to(device)

    flops = {"mm": count_flops(ours, images, tokens), "open_clip": count_flops(theirs, images, tokens)}
    for r in (ours, theirs):
        r.step(images, tokens)  # warm-up (allocator, kernels)
    peak = {}
    for name, r in (("mm", ours), ("open_clip", theirs)):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
            r.timed_step(images, tokens)
            peak[name] = torch.cuda.max_memory_allocated() / 2**30
            r.times.clear()
    if args.cpu_memory and device.type == "cpu":
        peak = cpu_peaks(args)
    for _ in range(args.steps):  # interleaved
        ours.timed_step(images, tokens)
        theirs.timed_step(images, tokens)

    print(f"# {args.model}, batch {args.batch}, {args.precision}{', compiled' if args.compile else ''}, "
          f"{device.type}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, params mm {n_ours:,} / open_clip {n_theirs:,}")
    print("| package | median step (ms) | samples/s | GFLOP/sample | peak mem (GiB) | MFU |")
    print("| --- | --- | --- | --- | --- | --- |")
    sps = {}
    for name, r in (("mm", ours), ("open_clip", theirs)):
        med = statistics.median(r.times)
        sps[name] = args.batch / med
        mfu = f"{flops[name] * sps[name] / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "-"
        mem = f"{peak[name]:.2f}" if name in peak else "-"
        print(f"| {name} | {med * 1000:.1f} | {sps[name]:.1f} | {flops[name] / 1e9:.3f} | {mem} | {mfu} |")
    ratio_mem = f", peak memory {peak['mm'] / peak['open_clip']:.2f}" if peak else ""
    print(f"ratio mm / open_clip: samples/s {sps['mm'] / sps['open_clip']:.2f}, "
          f"FLOPs/sample {flops['mm'] / flops['open_clip']:.2f}{ratio_mem}")


if __name__ == "__main__":
    main()
