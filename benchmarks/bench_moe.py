"""MoE cost: training-step time of an MoE preset vs its dense twin with equal ACTIVE parameters.

    python benchmarks/bench_moe.py --model tiny-moe --batch 64 --steps 10
    python benchmarks/bench_moe.py --model ViT-B-16-moe --batch 256 --precision bf16 --steps 20   # GPU

The twin is the same model with every MoE FFN replaced by one dense MLP of ``top_k x`` the expert width
(``MoEConfig.dense_twin``; for tiny-moe it is the preset tiny-moe-dense):
each token then goes through the same number of FFN weights as it does through its top-k experts, so the
FLOPs per token match and the ratio measures what routing costs (router, dispatch into capacity buffers,
combine, the load-balancing and z losses) plus the work of capacity slack (``capacity_factor`` > 1 pads
every expert's buffer). Steps of the two models alternate so machine noise hits both alike; the report
is the median step time of each and the ratio MoE / dense (the issue's target: <= 1.3). The MoE model runs
twice, once per expert dispatch (``MoEConfig.dispatch``: grouped GEMM over the kept rows vs the padded
(experts, capacity, dim) buffer), same weights, so the report also shows what the grouped GEMM saves.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

import mm
from mm.layers import MoE


def dense_twin(spec: str) -> mm.ModelConfig:
    """The preset with ``moe.dense_twin`` set in every stack: each MoE FFN becomes one dense FFN of top_k x
    its expert width (same active parameters and FLOPs per token), e.g. tiny-moe -> tiny-moe-dense."""
    from mm.models.build import resolve_config

    cfg = resolve_config(spec)
    for stack in (cfg.vision.transformer, cfg.text.transformer, cfg.one_tower,
                  cfg.decoder.transformer if cfg.decoder is not None else None):
        if stack is not None and stack.moe is not None:
            stack.moe.dense_twin = True
    return cfg


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-moe")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else None

    def with_dispatch(dispatch: str) -> torch.nn.Module:
        torch.manual_seed(0)
        model = mm.create_model(args.model)
        for m in model.modules():
            if isinstance(m, MoE):
                m.cfg = dataclasses.replace(m.cfg, dispatch=dispatch)
        return model.to(device).train()

    moe, padded = with_dispatch("grouped"), with_dispatch("padded")
    if device.type == "cuda" and dtype is None:  # torch's grouped GEMM is bf16-only on CUDA
        moe = with_dispatch("auto")
    torch.manual_seed(0)
    dense = mm.create_model(dense_twin(args.model)).to(device).train()
    cfg = moe.config
    images = torch.randn(args.batch, 3, cfg.vision.image_size, cfg.vision.image_size, device=device)
    tokens = mm.get_tokenizer(moe)([f"a photo of a thing number {i}" for i in range(args.batch)]).to(device)
    loss_fn = mm.ClipLoss()
    runs = {}
    for name, model in (("moe", moe), ("padded", padded), ("dense", dense)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
        runs[name] = (model, opt, [])

    def step(model, opt) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_fn(model(images, tokens))["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for model, opt, _ in runs.values():  # warm-up
        step(model, opt)
    for _ in range(args.steps):
        for model, opt, times in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step(model, opt)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    count = {n: sum(p.numel() for p in m.parameters()) for n, (m, _, _) in runs.items()}
    med = {n: statistics.median(t) for n, (_, _, t) in runs.items()}
    print(f"{args.model} batch {args.batch} {args.precision} {device} torch {torch.__version__}, "
          f"median of {args.steps} steps")
    for n in runs:
        print(f"{n:7s} {med[n] * 1000:8.1f} ms/step  {args.batch / med[n]:8.1f} samples/s  {count[n]:,} parameters")
    print(f"MoE / dense step time: {med['moe'] / med['dense']:.2f} "
          f"(padded dispatch: {med['padded'] / med['dense']:.2f})")


if __name__ == "__main__":
    main()
