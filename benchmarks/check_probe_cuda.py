"""mm benchmark's linear probe (mm.eval.benchmark_probe) against clip_benchmark 1.6.2's own, on CUDA, where
clip_benchmark's probe runs (its ``linear_probe.evaluate`` asserts ``device == 'cuda'``; on the CPU,
tests/test_benchmark_probe.py runs it with its CUDA calls mapped to the CPU).

Features are synthetic (class clusters on the sphere, overlapping so that accuracy is below 1) and written where
clip_benchmark caches its features (``FEATURE_ROOT/MODEL_ID/features_{train,val,test}.pt`` + targets), so
clip_benchmark skips featurizing and runs its probe on them; ``torch.manual_seed(seed)`` just before it, as its CLI
seeds at startup. mm's probe gets the same tensors. Cases: the weight-decay search on a val split, no val split,
few-shot k = 5, and fp16 autocast (clip_benchmark's default ``amp`` on CUDA). Every metric must be equal to 1e-6 and
the same weight decay chosen; wall time of each side is printed.

    python benchmarks/check_probe_cuda.py --cb-path /tmp/cb   # clip_benchmark + numpy < 2.3 + scikit-learn there

Exit 0 when every case is equal.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PEER = """
import json, sys, time, torch
from clip_benchmark.metrics import linear_probe
a = json.loads(sys.argv[1])
if a["cpu"]:  # --cpu: a dry run of this script without a GPU, clip_benchmark's CUDA calls mapped to the CPU
    torch.nn.Module.cuda = lambda self, device=None: self
    torch.Tensor.cuda = lambda self, *x, **k: self
    _to = torch.Tensor.to
    torch.Tensor.to = lambda self, *x, **k: _to(self, *("cpu" if v == "cuda" else v for v in x), **k)
torch.manual_seed(a["seed"])
t0 = time.perf_counter()
m = linear_probe.evaluate(None, None, None, a["k"], a["batch"], 0, a["lr"], a["epochs"], a["model_id"], a["seed"],
                          a["root"], "cuda", val_dataloader=True if a["val"] else None, normalize=True, amp=a["amp"])
m["seconds"] = time.perf_counter() - t0
print(json.dumps({k: v if isinstance(v, (bool, int)) else float(v) for k, v in m.items()}))
"""


def features(n: int, centers: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(len(centers), (n,), generator=g)
    x = centers[y] + 5.0 * torch.randn(n, centers.shape[1], generator=g) / centers.shape[1] ** 0.5
    return torch.nn.functional.normalize(x, dim=-1), y


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cb-path", required=True, help="a directory holding clip_benchmark 1.6.2 (pip --target)")
    p.add_argument("--work", default="/tmp/check_probe")
    p.add_argument("--n", type=int, default=4000, help="training features (val: n/4, test: n/2)")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--cpu", action="store_true", help="a dry run of this script on the CPU (fp16 case left out)")
    args = p.parse_args()
    device = "cpu" if args.cpu else "cuda"
    from mm.eval.benchmark_probe import linear_probe

    g = torch.Generator().manual_seed(0)
    centers = torch.nn.functional.normalize(torch.randn(args.classes, args.dim, generator=g), dim=-1)
    data = {s: features(n, centers, g) for s, n in (("train", args.n), ("val", args.n // 4), ("test", args.n // 2))}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([args.cb_path, os.environ.get("PYTHONPATH", "")])}
    ok = True
    for name, k, val, amp in (("wd search on val", -1, True, False), ("no val (wd 0)", -1, False, False),
                              ("few-shot k=5", 5, True, False), ("fp16 autocast", -1, True, True)):
        if amp and args.cpu:
            continue
        model_id = name.replace(" ", "_").replace("(", "").replace(")", "").replace("=", "")
        d = Path(args.work) / model_id
        d.mkdir(parents=True, exist_ok=True)
        for split, (x, y) in data.items():
            torch.save(x, d / f"features_{split}.pt")
            torch.save(y, d / f"targets_{split}.pt")
        a = {"k": k, "batch": 64, "lr": 0.1, "epochs": args.epochs, "model_id": model_id, "seed": 0,
             "root": args.work, "val": val, "amp": amp, "cpu": args.cpu}
        proc = subprocess.run([sys.executable, "-c", PEER, json.dumps(a)], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: clip_benchmark failed:\n{proc.stderr[-3000:]}")
            return 1
        ref = json.loads(proc.stdout.strip().splitlines()[-1])
        t0 = time.perf_counter()
        got = linear_probe(*data["train"], *data["test"], *(data["val"] if val else (None, None)), fewshot_k=k,
                           epochs=args.epochs, batch_size=64, seed=0, device=device,
                           autocast_dtype=torch.float16 if amp else None)
        t_mm = time.perf_counter() - t0
        equal = got["weight_decay"] == ref["weight_decay"] and all(
            abs(float(got[m]) - ref[m]) <= 1e-6 or (got[m] != got[m] and ref[m] != ref[m])
            for m in ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall"))
        ok &= equal
        print(f"{name}: {'equal' if equal else 'DIFFERENT'}; clip_benchmark {ref['seconds']:.1f} s, mm {t_mm:.1f} s\n"
              f"  clip_benchmark { {m: ref[m] for m in ('lp_acc1', 'lp_acc5', 'lp_mean_per_class_recall', 'weight_decay')}}\n"
              f"  mm             { {m: got[m] for m in ('lp_acc1', 'lp_acc5', 'lp_mean_per_class_recall', 'weight_decay')}}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
