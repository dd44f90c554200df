"""Per-process memory and step time of sharded (train.fsdp: FSDP2 per block) vs DDP training, same model, batch and
steps, on N processes (gloo CPU ranks here, NCCL GPUs with --device cuda).

    python benchmarks/bench_fsdp.py --model ViT-B-32 --processes 2 --batch 4 --steps 3           # CPU
    python benchmarks/bench_fsdp.py --model ViT-B-16 --processes 8 --batch 64 --device cuda     # GPUs

Each mode runs in its own fresh processes (torch.multiprocessing, one per rank), with the trainer's pieces:
``mm.create_model`` with the same seed on every rank, ``mm.train.fsdp.shard_model`` or DistributedDataParallel,
``make_optimizer`` (AdamW), ``ClipLoss`` over all ranks, random images and captions. Memory, during the steps
(after set-up, so the whole model each rank builds before sharding it is not counted): on CUDA the peak allocated
bytes; on the CPU the peak resident set sampled every millisecond, less the process's resident set before the
model was built. Both count weights, gradients, optimizer state and activations alike. What should move:
weights, gradients and AdamW state (16 bytes per parameter in fp32) fall to 1/N per process under FSDP, plus
one block's gathered weights at a time; DDP also keeps a bucketed copy of the gradients.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import threading
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def local_bytes(t: torch.Tensor | None) -> int:
    """Bytes this process holds of ``t`` (a DTensor's local shard)."""
    if t is None:
        return 0
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Weights, gradients and optimizer state held by this process, counted tensor by tensor."""
    total = sum(local_bytes(p) + local_bytes(p.grad) for p in model.parameters())
    return total + sum(local_bytes(v) for st in opt.state.values() for v in st.values() if torch.is_tensor(v))


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


class PeakResident:
    """The largest resident set seen while running (sampled by a thread every millisecond)."""

    def __init__(self):
        self.peak, self._stop = resident(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, resident())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, resident())


def worker(rank: int, args: argparse.Namespace, mode: str, init: str, out_dir: str) -> None:
    import mm
    from mm.train.fsdp import shard_model
    from mm.train.optim import make_optimizer
    from mm.utils.dist import average_gradients

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.processes))
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}", rank=rank,
                            world_size=args.processes)
    try:
        base = 0 if cuda else resident()
        torch.manual_seed(0)
        model = mm.create_model(args.model).to(device)
        replicated = []
        if mode == "fsdp":
            replicated = shard_model(model)
            forward = model
        else:
            forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        opt = make_optimizer(model, 1e-4, 0.1, (0.9, 0.98), 1e-6, device, None)
        loss_fn = mm.ClipLoss()
        v = model.config.vision
        g = torch.Generator().manual_seed(rank)
        images = torch.randn(args.batch, 3, v.image_size, v.image_size, generator=g).to(device)
        tokens = mm.get_tokenizer(model)([f"a photo of thing {rank} {i}" for i in range(args.batch)]).to(device)
        autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")
        times = []
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        sampler = None if cuda else PeakResident()
        for _ in range(args.steps):
            t0 = time.perf_counter()
            with autocast:
                out = forward(images, tokens)
            loss = loss_fn(out)["loss"]
            loss.backward()
            average_gradients(replicated)
            opt.step()
            held = state_bytes(model, opt)  # gradients still present
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) if cuda else sampler.stop() - base
        n_params = sum(p.numel() for p in mm.create_model(args.model).parameters()) if rank == 0 else 0
        torch.save({"peak": peak, "held": held, "times": times, "params": n_params}, f"{out_dir}/{mode}_{rank}.pt")
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="per process")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in ("ddp", "fsdp"):
            mp.spawn(worker, args=(args, mode, f"{tmp}/init_{mode}", tmp), nprocs=args.processes, join=True)
            ranks = [torch.load(f"{tmp}/{mode}_{r}.pt") for r in range(args.processes)]
            results[mode] = {"peak": max(r["peak"] for r in ranks), "held": max(r["held"] for r in ranks),
                             "step": statistics.median(t for r in ranks for t in r["times"][1:] or r["times"]),
                             "params": ranks[0]["params"]}
    n = results["ddp"]["params"]
    print(f"{args.model}: {n:,} parameters, {args.processes} processes on {args.device}, batch {args.batch} per "
          f"process, {args.precision}; weights + grads + AdamW state = {16 * n / 2**30:.2f} GiB unsharded")
    for mode, r in results.items():
        print(f"{mode:5s} per process: weights + grads + optimizer state {r['held'] / 2**30:5.2f} GiB, peak memory "
              f"{r['peak'] / 2**30:5.2f} GiB, step {1000 * r['step']:7.1f} ms")
    print(f"fsdp / ddp: training state {results['fsdp']['held'] / results['ddp']['held']:.2f}, "
          f"peak memory {results['fsdp']['peak'] / results['ddp']['peak']:.2f}, "
          f"step time {results['fsdp']['step'] / results['ddp']['step']:.2f}")


if __name__ == "__main__":
    main()
