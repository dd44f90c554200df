"""The kernels mm chooses for itself, timed against the default they replace (forward + backward):

* attention in bf16 training on the CPU: SDPA's flash kernel vs its math backend, over key lengths
  (mm.layers.attention picks math up to CPU_MATH_MAX_KEYS keys);
* the caption loss: ``F.cross_entropy(logits.float(), ...)`` vs mm's TokenCrossEntropy over CLIP's vocabulary;
* the AdamW step over tiny-coca's parameters: foreach (torch's batched default) vs fused (mm's choice).

    python benchmarks/bench_kernels.py                 # CPU, the shapes of the built-in demo (tiny-coca, batch 128)
    python benchmarks/bench_kernels.py --device cuda   # GPU: the caption loss (attention keeps SDPA's choice there)

Prints one Markdown table per kernel: median ms of each way and the ratio.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mm.losses import caption_loss


def timed(fn, device: torch.device, repeats: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def attention(device: torch.device, dtype: torch.dtype, repeats: int) -> None:
    print(f"\n| q, k, v shape (B, H, T, Dh), {dtype} | flash (ms) | math (ms) | flash / math |\n| --- | --- | --- | --- |")
    for shape in [(128, 3, 17, 64), (128, 2, 33, 64), (128, 3, 65, 64), (32, 6, 129, 64), (32, 6, 197, 64),
                  (16, 12, 257, 64)]:
        q, k, v = (torch.randn(shape, dtype=dtype, device=device, requires_grad=True) for _ in range(3))
        res = []
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            def step(backend=backend):
                with sdpa_kernel(backend):
                    out = F.scaled_dot_product_attention(q, k, v)
                out.sum().backward()
            res.append(timed(step, device, repeats))
        print(f"| {shape} | {res[0]:.1f} | {res[1]:.1f} | {res[0] / res[1]:.2f} |")


def cross_entropy(device: torch.device, dtype: torch.dtype, repeats: int, rows: int) -> None:
    print(f"\n| caption loss, ({rows}, 49408) {dtype} logits | ms | vs F.cross_entropy |\n| --- | --- | --- |")
    x = torch.randn(rows, 49408, dtype=dtype, device=device, requires_grad=True)
    y = torch.randint(0, 49408, (rows,), device=device)
    base = None
    for name, fn in [("F.cross_entropy(logits.float())", lambda: F.cross_entropy(x.float(), y)),
                     ("TokenCrossEntropy (mm)", lambda: caption_loss(x, y))]:
        def step(fn=fn):
            x.grad = None
            fn().backward()
        ms = timed(step, device, repeats)
        base = base or ms
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}x |")


def adamw(device: torch.device, repeats: int) -> None:
    import mm  # noqa: PLC0415 (the model's parameters, nothing else)
    params = [p for p in mm.create_model("tiny-coca").to(device).parameters()]
    for p in params:
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in params)
    print(f"\n| AdamW step, tiny-coca ({n / 1e6:.1f}M fp32 parameters) | ms | vs foreach |\n| --- | --- | --- |")
    base = None
    for name in ("foreach", "fused"):
        opt = torch.optim.AdamW(params, lr=1e-3, **{name: True})
        ms = timed(opt.step, device, repeats)
        base = base or ms
        print(f"| {name} | {ms:.1f} | {base / ms:.2f}x |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rows", type=int, default=1314, help="caption tokens (tiny-coca, batch 128: ~1,300)")
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"# {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if device.type == "cpu":
        attention(device, torch.bfloat16, args.repeats)
        attention(device, torch.float32, args.repeats)
    cross_entropy(device, torch.bfloat16, args.repeats, args.rows)
    cross_entropy(device, torch.float32, args.repeats, args.rows)
    adamw(device, args.repeats)


if __name__ == "__main__":
    main()
