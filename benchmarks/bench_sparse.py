"""Block-sparse attention speed: flex_attention with a BigBird block mask vs dense SDPA, at 4k tokens.

    python benchmarks/bench_sparse.py                                   # CUDA: bf16, fwd+bwd, one layer
    python benchmarks/bench_sparse.py --depth 12                        # a ViT-B-sized stack of 12 blocks
    python benchmarks/bench_sparse.py --tokens 16384 --window 2 --random-blocks 2
    python benchmarks/bench_sparse.py --device cpu --repeats 3          # CPU: small sizes, forward only

Three variants of the same module (same weights and input):

- ``full``: ordinary attention, no mask (SDPA picks its flash / memory-efficient kernel on CUDA);
- ``sparse-sdpa``: the block-sparse pattern as a boolean mask through SDPA (``backend: dense``, the
  reference; every score is computed, then masked);
- ``sparse-flex``: the same pattern as a ``BlockMask`` through flex_attention (``backend: flex``), compiled
  on CUDA, so blocks the mask leaves empty are never computed.

``--depth 0`` (default) times one ``Attention`` layer, masks built once outside the timing; ``--depth N``
times a ``Transformer`` of N blocks, which builds its masks in every forward (included, as in training).
Reports the median time of ``--repeats`` timed iterations after ``--warmup`` (which absorb compilation),
peak CUDA memory, the ratios to ``full`` and the fraction of (query block, key block) tiles flex computes.

On the CPU torch 2.14's flex_attention runs eagerly (it materialises every score, then masks) and has no
backward, so the CPU run times forwards only and is a smoke test of the script, not a measurement of
block skipping; the measurement is the CUDA run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import nn

from mm.layers import Attention, SparseAttentionConfig, Transformer, TransformerConfig
from mm.layers.sparse import SparsePattern, computed_fraction


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> tuple[float, float]:
    """Median seconds per call and peak memory in GiB (CUDA; 0 on the CPU)."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return statistics.median(times), peak


def step_fn(module: nn.Module, x: torch.Tensor, kwargs: dict, backward: bool, autocast) -> Callable[[], None]:
    """One forward (and backward) of ``module`` on ``x``."""
    def step() -> None:
        with autocast(), (nullcontext() if backward else torch.no_grad()):
            y = module(x, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
        if backward:
            y.float().square().mean().backward()
            module.zero_grad(set_to_none=True)
            x.grad = None
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--batch", type=int, help="default: 8 on CUDA, 1 on the CPU")
    p.add_argument("--width", type=int, help="default: 768 on CUDA (ViT-B), 256 on the CPU")
    p.add_argument("--heads", type=int, help="default: width / 64")
    p.add_argument("--depth", type=int, default=0, help="0: one Attention layer; N: a Transformer of N blocks")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--window", type=int, default=1)
    p.add_argument("--global-tokens", type=int, default=1)
    p.add_argument("--random-blocks", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 autocast on CUDA, fp32 on the CPU")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.batch or (8 if cuda else 1)
    width = args.width or (768 if cuda else 256)
    heads = args.heads or width // 64
    precision = args.precision or ("bf16" if cuda else "fp32")
    backward = cuda  # torch 2.14: no flex_attention backward on the CPU
    autocast = (lambda: torch.autocast(device.type, torch.bfloat16)) if precision == "bf16" else nullcontext

    sparse = {b: SparseAttentionConfig(args.block_size, args.window, args.global_tokens, args.random_blocks,
                                       backend=b) for b in ("dense", "flex")}
    torch.manual_seed(0)
    x = torch.randn(batch, args.tokens, width, device=device, requires_grad=backward)
    # built directly: SparsePattern.masks would hand the CPU a boolean mask for the flex backend too
    masks = {b: SparsePattern(cfg, 1).build(0, args.tokens, args.tokens, causal=args.causal, key_padding_mask=None,
                                            device=device, flex=b == "flex")
             for b, cfg in sparse.items()}
    fraction = computed_fraction(masks["flex"])
    if args.depth == 0:
        module = Attention(width, heads).to(device)
        variants = [("full", module, {"is_causal": args.causal}),
                    ("sparse-sdpa", module, {"attn_mask": masks["dense"]}),
                    ("sparse-flex", module, {"attn_mask": masks["flex"]})]
    else:
        torch.manual_seed(0)
        full = Transformer(TransformerConfig(width, args.depth, heads)).to(device)
        variants = [("full", full, {"causal": args.causal})]
        for name, b in (("sparse-sdpa", "dense"), ("sparse-flex", "flex")):
            stack = Transformer(TransformerConfig(width, args.depth, heads, sparse_attention=sparse[b])).to(device)
            stack.load_state_dict(full.state_dict())
            variants.append((name, stack, {"causal": args.causal}))
    rows = {name: timed(step_fn(module, x, kw, backward, autocast), device, args.warmup, args.repeats)
            for name, module, kw in variants}

    what = "one Attention layer" if args.depth == 0 else f"Transformer of {args.depth} blocks"
    print(f"{what}: batch {batch}, {args.tokens} tokens, width {width}, {heads} heads, {precision}, "
          f"{'forward+backward' if backward else 'forward only'}, {device} ({torch.__version__})")
    print(f"pattern: block {args.block_size}, window {args.window}, global {args.global_tokens}, "
          f"random {args.random_blocks}{', causal' if args.causal else ''}: flex computes "
          f"{fraction:.1%} of {-(-args.tokens // args.block_size)}^2 tiles")
    if args.depth and not cuda:
        print("  (off CUDA a stack's flex config runs its mask through SDPA: see SparsePattern.use_flex)")
    base = rows["full"][0]
    for name, (sec, peak) in rows.items():
        mem = f"  peak {peak:6.2f} GiB" if cuda else ""
        print(f"  {name:12s} {sec * 1e3:9.2f} ms  x{sec / base:5.2f} of full{mem}")
    print(f"sparse-flex / full = {rows['sparse-flex'][0] / base:.3f}, "
          f"sparse-flex / sparse-sdpa = {rows['sparse-flex'][0] / rows['sparse-sdpa'][0]:.3f}")


if __name__ == "__main__":
    main()
