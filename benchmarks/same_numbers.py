"""Same numbers across a change: the same training runs in an old and a new tree give identical losses and weights.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/same_numbers.py --old REV [--new REV|DIR] [--work DIR]
        [--only builtin,clip,siglip,coca,distill,finetune,resume] [--builtin-precision fp32|bf16] [--atol 0]

--old is a git revision, exported with `git archive` under WORK/trees/; --new is one too, or a directory (default:
this working tree). Every run is a fresh `python -m mm ...` process of this interpreter (the repository's .venv)
with cwd and PYTHONPATH at its tree, so it imports that tree's `mm` (checked: `mm.__file__` lies in the tree).
All on the CPU, 1 thread (OMP_NUM_THREADS=1), 1 data worker, seed 0, run one after another. The cases:

  builtin   data/builtin.yaml (each tree's own; demo-coca, batch 128), 40 steps, no evaluation, train.precision
            pinned to --builtin-precision (default fp32): the old file said bf16, the new one says auto (bf16 on a GPU
            or a CPU with native bf16, fp32 elsewhere), so each tree's own value could differ; the siglip case
            covers bf16
  clip      tiny-clip with patch dropout 0.25 (draws from the RNG), CLIP loss, batch 16 x grad_accum 2, 40 steps
  siglip    tiny-siglip, SigLIP loss in tiles of 8 (loss_block), bf16, batch 16, 30 steps
  coca      tiny-coca with patch dropout 0.25, gradient caching in chunks of 8 (RNG replayed per chunk), captions
            on half of each batch, batch 16, 30 steps
  distill   micro-clip distilled from WORK/teacher (a random tiny-clip, mm.save_pretrained), KL + feature,
            batch 16, 30 steps
  finetune  mm finetune of WORK/teacher on the built-in labels, batch 16, 30 steps, WiSE-FT alphas 0 and 1
  resume    the OLD tree runs `clip` with stop_after=20 and checkpoint_every=10; the NEW tree resumes that run
            directory (a copy; train.resume=auto) to step 40; compared with the old tree's uninterrupted `clip`

Compared per case: every metrics.jsonl key ending in `loss`, step by step (log_every=1), and every tensor of the
*.safetensors files the run leaves (final/ of `mm train`, plus the distillation projection of its last checkpoint;
finetuned/ of `mm finetune`: model + head). PASS when
both max |diff| are <= --atol (default 0: bit-identical). The data set (`mm shards builtin`, the Makefile's
`make run` default) and the teacher are made once by the old tree under WORK and reused. Exit 1 if a case differs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("builtin", "clip", "siglip", "coca", "distill", "finetune", "resume")
DROP_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")  # never a launched process group


def train_shards(work: Path) -> str:
    return f"{work}/data/builtin/train-{{000000..000019}}.tar.gz"


def small(work: Path, steps: int) -> list[str]:
    """What every small `mm train` case shares: the built-in shards, batch 16, one worker, a log record per step,
    no checkpoints, no evaluation, no resume."""
    return [f"data.train={train_shards(work)}", "data.batch_size=16",
            "data.workers=1", "data.shuffle_buffer=256", f"train.steps={steps}", "train.warmup_steps=5",
            "train.lr=1e-3", "train.seed=0", "train.log_every=1", "train.checkpoint_every=0", "train.resume=none",
            "eval.every=0"]


def setting(args: list[str], *overrides: str) -> list[str]:
    """``args`` with ``overrides`` in place of the same keys' earlier values."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [a for a in args if a.split("=", 1)[0] not in keys] + list(overrides)


def train_args(case: str, work: Path, builtin_precision: str = "fp32") -> list[str]:
    """The `mm train` arguments of a case (output_dir is added by the caller)."""
    if case == "builtin":
        return ["data/builtin.yaml", "train.steps=40", f"train.precision={builtin_precision}",
                f"data.train={train_shards(work)}",
                "data.workers=1", "train.log_every=1", "train.checkpoint_every=0", "train.resume=none",
                "eval.every=0", "eval.zeroshot.shards=null", "eval.captioning.shards=null"]
    if case in ("clip", "resume"):
        return ["model=tiny-clip", "model.vision.patch_dropout=0.25", "train.loss=clip", "train.grad_accum=2",
                *small(work, 40)]
    if case == "siglip":
        return ["model=tiny-siglip", "train.loss=siglip", "train.loss_block=8", "train.precision=bf16",
                *small(work, 30)]
    if case == "coca":
        return ["model=tiny-coca", "model.vision.patch_dropout=0.25", "train.grad_cache_chunk=8",
                "train.caption_fraction=0.5", *small(work, 30)]
    if case == "distill":
        return ["model=micro-clip", f"distill.teacher={work}/teacher", "distill.kl_weight=1.0",
                "distill.feature_weight=1.0", *small(work, 30)]
    raise ValueError(case)


def finetune_args(work: Path) -> list[str]:
    return ["--model", str(work / "teacher"), "--train", f"{work}/data/builtin/train-{{000000..000003}}.tar.gz",
            "--test", f"{work}/data/builtin/test-000000.tar.gz", "--max-test", "64", "--steps", "30",
            "--batch-size", "16", "--lr", "1e-4", "--warmup-steps", "5", "--seed", "0", "--log-every", "1",
            "--workers", "1", "--device", "cpu", "--wise-alpha", "0,1"]


class Tree:
    """A source tree the runs import `mm` from."""

    def __init__(self, name: str, path: Path, label: str):
        self.name, self.path, self.label = name, path.resolve(), label

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in DROP_ENV and not k.startswith("ACCELERATE_")}
        env.update(PYTHONPATH=str(self.path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
                   PYTHONHASHSEED="0")
        return env

    def run(self, args: list[str], log: Path) -> float:
        """`python ARGS` in this tree, output to ``log``; returns the wall time. Raises on a non-zero exit."""
        log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(log, "w") as f:
            rc = subprocess.run([sys.executable, *args], cwd=self.path, env=self.env(), stdout=f,
                                stderr=subprocess.STDOUT).returncode
        dt = time.perf_counter() - t0
        print(f"  [{self.name}] {' '.join(args[:3])} ... -> {log.name}: {dt:.1f} s" + (f", EXIT {rc}" if rc else ""),
              flush=True)
        if rc:
            tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"{self.name} tree: exit {rc}; the end of {log}:\n{tail}")
        return dt

    def check_import(self) -> None:
        out = subprocess.run([sys.executable, "-c", "import mm; print(mm.__file__)"], cwd=self.path, env=self.env(),
                             capture_output=True, text=True, check=True).stdout.strip()
        print(f"{self.name}: {self.label}\n  mm.__file__ = {out}")
        if not Path(out).resolve().is_relative_to(self.path):
            raise SystemExit(f"the {self.name} tree's runs would import mm from {out}, not from {self.path}")


def make_tree(name: str, spec: str, work: Path) -> Tree:
    """A directory as it is, else a git revision exported (once) to WORK/trees/SHA."""
    if Path(spec).is_dir():
        return Tree(name, Path(spec), f"directory {Path(spec).resolve()}")
    sha = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--verify", f"{spec}^{{commit}}"],
                         capture_output=True, text=True, check=True).stdout.strip()
    dest = work / "trees" / sha
    if not (dest / ".exported").is_file():
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        archive = subprocess.Popen(["git", "-C", str(REPO), "archive", sha], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(dest)], stdin=archive.stdout, check=True)
        if archive.wait():
            raise RuntimeError(f"git archive {sha} failed")
        (dest / ".exported").write_text(sha + "\n")
    return Tree(name, dest, f"{spec} = {sha} (git archive)")


def prepare(old: Tree, work: Path) -> None:
    """The built-in shards and the distillation / fine-tuning teacher, made once by the old tree."""
    if not (work / "data/builtin/info.json").is_file():
        old.run(["-m", "mm", "shards", "builtin", str(work / "data/builtin")], work / "logs/shards.log")
    if not (work / "teacher/model.safetensors").is_file():
        old.run(["-c", "import sys, torch, mm; torch.manual_seed(1); "
                       "mm.save_pretrained(mm.create_model('tiny-clip'), sys.argv[1])", str(work / "teacher")],
                work / "logs/teacher.log")


def run_case(case: str, tree: Tree, work: Path, builtin_precision: str = "fp32") -> Path:
    """One case in one tree, into a fresh WORK/runs/TREE/CASE; returns the run directory."""
    out = work / "runs" / tree.name / case
    shutil.rmtree(out, ignore_errors=True)
    if case == "finetune":
        tree.run(["-m", "mm", "finetune", *finetune_args(work), "--out", str(out)], out.with_suffix(".log"))
    else:
        tree.run(["-m", "mm", "train", *train_args(case, work, builtin_precision), f"output_dir={out}"], out.with_suffix(".log"))
    return out


def run_resume(old: Tree, new: Tree, work: Path) -> Path:
    """The old tree stops at step 20 (checkpoints at 10 and 20); the new tree resumes a copy of that run to 40."""
    part = work / "runs" / old.name / "resume-to-20"
    shutil.rmtree(part, ignore_errors=True)
    base = train_args("resume", work)
    stop = setting(base, "train.stop_after=20", "train.checkpoint_every=10")
    old.run(["-m", "mm", "train", *stop, f"output_dir={part}"], part.with_suffix(".log"))
    out = work / "runs" / new.name / "resume"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(part, out)
    resume = setting(base, "train.checkpoint_every=10", "train.resume=auto")
    new.run(["-m", "mm", "train", *resume, f"output_dir={out}"], out.with_suffix(".log"))
    return out


def losses(run: Path, first_step: int = 1) -> dict[tuple[int, str], float]:
    """(step, key) -> value of every metrics.jsonl key ending in ``loss``, from ``first_step`` on."""
    found = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        for k, v in r.items():
            if k.endswith("loss") and isinstance(v, (int, float)) and r.get("step", 0) >= first_step:
                found[(r["step"], k)] = float(v)
    return found


def loss_diff(a: dict, b: dict) -> tuple[int, float, list[str]]:
    """(steps compared, max |diff|, problems); a key or step missing on one side counts as inf."""
    problems = [f"{'old' if k in a else 'new'} only: step {k[0]} {k[1]}" for k in sorted(set(a) ^ set(b))]
    diffs = [0.0 if a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) else abs(a[k] - b[k])
             for k in set(a) & set(b)]
    worst = max(diffs + [math.inf] * bool(problems) + [0.0])
    worst = math.inf if math.isnan(worst) else worst
    return len({s for s, _ in set(a) | set(b)}), worst, problems[:5]


def weights(run: Path) -> dict[str, object]:
    """Every tensor of the model directory a run ends with (final/ or finetuned/), keyed FILE:NAME; with
    distillation also the projection (trained, but only in checkpoints: the newest one's distill.safetensors)."""
    from safetensors.torch import load_file

    d = run / "finetuned" if (run / "finetuned").is_dir() else run / "final"
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {d}")
    steps = sorted(run.glob("checkpoints/step_*/distill.safetensors"), key=lambda f: int(f.parent.name[5:]))
    return {f"{f.name}:{k}": v for f in files + steps[-1:] for k, v in load_file(str(f)).items()}


def weight_diff(a: dict, b: dict) -> tuple[float, list[str]]:
    import torch

    problems = [f"{'old' if k in a else 'new'} only: {k}" for k in sorted(set(a) ^ set(b))]
    worst = math.inf if problems else 0.0
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{k}: {x.dtype}{tuple(x.shape)} vs {y.dtype}{tuple(y.shape)}")
            worst = math.inf
            continue
        d = (x.double() - y.double()).abs()
        d[x.isnan() & y.isnan()] = 0  # NaN in the same place is the same number
        worst = max(worst, float(torch.nan_to_num(d, nan=math.inf).max()) if d.numel() else 0.0)
    return worst, problems[:5]


def compare(case: str, old_run: Path, new_run: Path, atol: float, first_step: int = 1) -> dict:
    steps, dl, problems = loss_diff(losses(old_run, first_step), losses(new_run, first_step))
    dw, wproblems = weight_diff(weights(old_run), weights(new_run))
    ok = dl <= atol and dw <= atol
    for p in problems + wproblems:
        print(f"  {case}: {p}")
    return {"case": case, "steps": steps, "loss": dl, "weight": dw, "result": "PASS" if ok else "FAIL"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="git revision of the old tree")
    p.add_argument("--new", default=str(REPO), help="git revision or directory of the new tree (default: %(default)s)")
    p.add_argument("--work", default=str(REPO / "benchmarks/runs/same_numbers"), help="trees, data, runs, logs")
    p.add_argument("--only", default=",".join(CASES), help="comma-separated cases (default: all)")
    p.add_argument("--builtin-precision", default="fp32", choices=("fp32", "bf16"),
                   help="train.precision of the builtin case in both trees (default: %(default)s)")
    p.add_argument("--atol", type=float, default=0.0, help="largest |diff| that passes (default 0: bit-identical)")
    args = p.parse_args()
    cases = [c.strip() for c in args.only.split(",") if c.strip()]
    if unknown := set(cases) - set(CASES):
        p.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    t0 = time.perf_counter()
    work = Path(args.work).resolve()
    old, new = make_tree("old", args.old, work), make_tree("new", args.new, work)
    old.check_import()
    new.check_import()
    print(f"python {sys.executable}; work {work}", flush=True)
    prepare(old, work)
    rows = []
    for case in cases:
        print(f"{case}:", flush=True)
        try:
            if case == "resume":  # against the old tree's uninterrupted `clip` run (made here if not this time)
                ref = work / "runs/old/clip"
                if "clip" not in cases[: cases.index(case)]:
                    ref = run_case("clip", old, work)
                rows.append(compare(case, ref, run_resume(old, new, work), args.atol, first_step=21))
            else:
                rows.append(compare(case, run_case(case, old, work, args.builtin_precision),
                                         run_case(case, new, work, args.builtin_precision), args.atol))
        except (RuntimeError, FileNotFoundError, subprocess.CalledProcessError) as e:
            print(f"  {case}: ERROR: {e}", flush=True)
            rows.append({"case": case, "steps": 0, "loss": math.nan, "weight": math.nan, "result": "ERROR"})
    print(f"\nold: {old.label}\nnew: {new.label}\natol: {args.atol:g}\n")
    print(f"{'case':<10}{'steps':>6}{'max |loss diff|':>18}{'max |weight diff|':>20}  result")
    for r in rows:
        print(f"{r['case']:<10}{r['steps']:>6}{r['loss']:>18.3g}{r['weight']:>20.3g}  {r['result']}")
    failed = [r["case"] for r in rows if r["result"] != "PASS"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} cases PASS"
          f"{'; differ: ' + ', '.join(failed) if failed else ''}; total wall time {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
