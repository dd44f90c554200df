"""Learning benchmark: mm's trainer vs open_clip's own trainer (open_clip_train) on CIFAR-10, on CPU.

    .venv/bin/python benchmarks/bench_learning.py                  # 390 steps = 2 epochs, both trainers
    .venv/bin/python benchmarks/bench_learning.py --quick          # 40-step smoke run
    .venv/bin/python benchmarks/bench_learning.py --only open_clip # one side (or --only mm)
    .venv/bin/python benchmarks/bench_learning.py --eval-only      # re-evaluate the models of a previous run

Both train mm's preset ``tiny-clip`` (open_clip gets a registered config with the same shapes; the parameter
counts are checked) with the same batch, optimizer steps, AdamW settings, warmup + cosine-to-0 schedule,
fp32, data workers and seed, one after the other, each with its own data pipeline, loss and loop. Gradient
clipping is off on both sides unless --grad-clip is given. One zero-shot loop built on open_clip's code
(``build_zero_shot_classifier``, a webdataset pass over the test shard) then evaluates both final models,
each with its package's tokenizer and eval transform (checked to give identical tensors), info.json's class
names and the templates in cifar10_zeroshot_templates.txt (CLIP's CIFAR-10 prompts minus the training ones).

Training time is the wall clock of the training loop only (no installs, imports, model building,
checkpoint writing or evaluation): open_clip's ``train_one_epoch``, timed by a wrapper, and mm's
metrics.jsonl clock from before its loop to its last step. Steps are counted where they happen (an
optimizer step hook for open_clip, metrics.jsonl for mm). open_clip_train needs webdataset 0.2.x and pandas:
they are pip-installed into benchmarks/.peer/site when missing, for the open_clip subprocess only. It rounds
an epoch up to a multiple of ``workers`` batches (2 x 50,000 samples would be 392 steps), so it runs ONE
epoch of ``steps * batch`` samples: exactly ``steps`` steps and a cosine of that length.
Prints a markdown table; writes ``<out>/results.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEER = HERE / ".peer"  # open_clip's model config and its site-packages (webdataset 0.2.86, pandas)
PEER_SITE = PEER / "site"
TEMPLATES = HERE / "cifar10_zeroshot_templates.txt"
OC_MODEL = "mm-tiny-clip"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="/work/shared/datasets/cifar10")
    p.add_argument("--model", default="tiny-clip", help="mm preset (open_clip gets the same shapes)")
    p.add_argument("--epochs", type=float, default=2.0, help="passes over the train set (sets --steps)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: epochs * samples / batch)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=None, help="max grad norm on both sides (default off)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="40 steps, warmup 5: a smoke run")
    p.add_argument("--only", choices=["mm", "open_clip"], default=None)
    p.add_argument("--eval-only", action="store_true", help="evaluate the final models already in --out")
    p.add_argument("--out", default=None, help="run folder (default benchmarks/runs/learning[-quick])")
    a = p.parse_args(argv)
    a.info = json.loads((Path(a.data) / "info.json").read_text())
    if a.quick:
        a.steps, a.warmup = a.steps or 40, min(a.warmup, 5)
    a.steps = a.steps or int(a.epochs * a.info["train"]["samples"] // a.batch)
    if a.steps % max(1, a.workers):
        p.error(f"--steps {a.steps} must be a multiple of --workers {a.workers} (open_clip_train's epoch rounding)")
    a.out = Path(a.out or HERE / "runs" / ("learning-quick" if a.quick else "learning"))
    a.train_url = str(Path(a.data) / f"train-{{0000..{len(a.info['train']['shards']) - 1:04d}}}.tar.gz")
    a.test_urls = [str(Path(a.data) / s) for s in a.info["test"]["shards"]]
    a.templates = [t.strip() for t in TEMPLATES.read_text().splitlines() if t.strip()]
    return a


# ---------------------------------------------------------------------------------------------- open_clip side
def write_open_clip_config(a) -> Path:
    """Register an open_clip model config with the shapes of mm preset ``a.model``; check the parameter counts."""
    import open_clip

    import mm

    cfg = mm.get_preset(a.model)
    v, t, vt, tt = cfg.vision, cfg.text, cfg.vision.transformer, cfg.text.transformer
    assert vt.act == tt.act == "gelu" and not (vt.moe or tt.moe) and v.pool == "cls" and t.pool == "eot"
    assert v.pos_embed == t.pos_embed == "learned" and t.causal and v.norm_pre and vt.qkv_bias and tt.qkv_bias
    oc_cfg = {
        "embed_dim": cfg.embed_dim,
        "vision_cfg": {"image_size": v.image_size, "patch_size": v.patch_size, "width": vt.width,
                       "layers": vt.depth, "head_width": vt.width // vt.heads, "mlp_ratio": vt.mlp_ratio},
        "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": tt.width,
                     "heads": tt.heads, "layers": tt.depth, "mlp_ratio": tt.mlp_ratio},
    }
    cfg_dir = PEER / "model_configs"
    cfg_dir.mkdir(parents=True, exist_ok=True)
    (cfg_dir / f"{OC_MODEL}.json").write_text(json.dumps(oc_cfg, indent=1) + "\n")
    open_clip.add_model_config(cfg_dir)
    n_mm = sum(p.numel() for p in mm.create_model(a.model).parameters())
    n_oc = sum(p.numel() for p in open_clip.create_model(OC_MODEL).parameters())
    if n_mm != n_oc:
        raise SystemExit(f"parameter counts differ: mm {n_mm:,} vs open_clip {n_oc:,}")
    a.params = n_mm
    return cfg_dir


def train_open_clip(a, cfg_dir: Path) -> dict:
    if not ((PEER_SITE / "webdataset").is_dir() and (PEER_SITE / "pandas").is_dir()):
        import numpy  # pinned to the venv's version, so that the target folder does not shadow it with another

        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(PEER_SITE),
                        "webdataset==0.2.86", "pandas", f"numpy=={numpy.__version__}"], check=True)
    logs = a.out / "open_clip"
    shutil.rmtree(logs, ignore_errors=True)
    argv = [
        "--model", OC_MODEL, "--device", "cpu", "--precision", "fp32", "--seed", str(a.seed),
        "--dataset-type", "webdataset", "--train-data", a.train_url,
        "--train-num-samples", str(a.steps * a.batch), "--epochs", "1",  # see the module docstring
        "--batch-size", str(a.batch), "--workers", str(a.workers),
        "--lr", str(a.lr), "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--wd", str(a.wd),
        "--warmup", str(a.warmup), "--lr-scheduler", "cosine",
        "--save-frequency", "0", "--log-every-n-steps", "10", "--report-to", "", "--logs", str(logs), "--name", "run",
    ] + (["--grad-clip-norm", str(a.grad_clip)] if a.grad_clip else [])
    stats_path = logs / "bench_stats.json"
    cmd = [sys.executable, __file__, "_peer", str(cfg_dir), str(stats_path), *argv]  # runs open_clip_train
    command = f"PYTHONPATH={PEER_SITE} {shlex.join(cmd)}"
    print(f"$ {command}", file=sys.stderr)
    load, t0 = os.getloadavg(), time.perf_counter()
    subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(PEER_SITE)), check=True)
    stats = json.loads(stats_path.read_text())
    stats.update(process_s=time.perf_counter() - t0, load_before=load, load_after=os.getloadavg(), command=command)
    stats_path.write_text(json.dumps(stats))
    return stats


def peer_main(cfg_dir: str, stats_path: str, argv: list[str]) -> None:
    """In the open_clip subprocess: register the config, count and time the steps, run open_clip_train."""
    import open_clip
    import open_clip_train.main as ocm
    import torch
    import webdataset
    from torch.optim.optimizer import register_optimizer_step_post_hook

    assert webdataset.__version__.startswith("0.2"), f"webdataset {webdataset.__version__}: run with PYTHONPATH"
    open_clip.add_model_config(cfg_dir)
    stats = {"steps": 0, "train_s": 0.0, "lr": [], "step_t": {}, "threads": torch.get_num_threads()}
    t_start = []

    def on_step(opt, *_):
        stats["steps"] += 1
        stats["lr"].append(opt.param_groups[0]["lr"])
        stats["step_t"][stats["steps"]] = time.perf_counter() - t_start[0]

    def timed(*args, train_one_epoch=ocm.train_one_epoch, **kw):
        t0 = time.perf_counter()
        t_start.append(t0)
        train_one_epoch(*args, **kw)
        stats["train_s"] += time.perf_counter() - t0

    register_optimizer_step_post_hook(on_step)
    ocm.train_one_epoch = timed
    if ocm.main(argv) not in (None, 0):
        raise SystemExit("open_clip_train failed")
    stats["checkpoint"] = str(Path(stats_path).parent / "run" / "checkpoints" / "epoch_1.pt")
    Path(stats_path).write_text(json.dumps(stats))


def load_open_clip(a, cfg_dir: Path, stats: dict):
    import open_clip
    import torch

    open_clip.add_model_config(cfg_dir)
    model, _, preprocess = open_clip.create_model_and_transforms(OC_MODEL)
    model.load_state_dict(torch.load(stats["checkpoint"], map_location="cpu")["state_dict"])
    return model, open_clip.get_tokenizer(OC_MODEL), preprocess


# --------------------------------------------------------------------------------------------------- mm side
def train_mm(a) -> dict:
    import yaml

    run = a.out / "mm"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    cfg = {
        "model": a.model,
        "data": {"train": a.train_url, "batch_size": a.batch, "workers": a.workers,
                 "shuffle_buffer": 5000},  # open_clip_train's sample shuffle buffer
        "train": {"steps": a.steps, "lr": a.lr, "warmup_steps": a.warmup, "weight_decay": a.wd,
                  "betas": [0.9, 0.98], "eps": 1e-6, "precision": "fp32", "seed": a.seed,
                  "grad_clip": a.grad_clip, "checkpoint_every": 0, "log_every": 10, "resume": "none"},
        "eval": {"zeroshot": {"shards": "::".join(a.test_urls), "classnames": a.info["classes"],
                              "templates": str(TEMPLATES), "label_key": "cls"}},
        "output_dir": str(run),
    }
    cfg_path = a.out / "mm.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    cmd = [sys.executable, str(HERE.parent / "train.py"), str(cfg_path)]
    print(f"$ {shlex.join(cmd)}", file=sys.stderr)
    load, t0 = os.getloadavg(), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=HERE.parent)
    stats = mm_stats(run)
    stats.update(process_s=time.perf_counter() - t0, load_before=load, load_after=os.getloadavg(),
                 command=shlex.join(cmd), final=str(run / "final"))
    (run / "bench_stats.json").write_text(json.dumps(stats))
    return stats


def mm_stats(run: Path) -> dict:
    """Steps, training time, lr and mm's own zero-shot result from metrics.jsonl, whose ``time`` counts from
    before the data workers start; the step-0 record precedes the loop, the last step's record follows its
    optimizer step and precedes the final checkpoint and evaluation."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(r["time"] for r in rows if r.get("step") == 0)
    steps = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "zeroshot_top1" in r]
    return {
        "steps": steps[-1]["step"],
        "train_s": steps[-1]["time"] - start,
        "lr_at": {r["step"]: r["lr"] for r in steps},  # the lr of (0-based) step `step`, set after step - 1
        "step_t": {r["step"]: r["time"] - start for r in steps},
        "own_top1": 100 * evals[-1]["zeroshot_top1"] if evals else None,  # mm logs fractions
        "own_top5": 100 * evals[-1]["zeroshot_top5"] if evals else None,
    }


def load_mm(stats: dict):
    import mm

    model = mm.load_pretrained(stats["final"])
    return model, mm.get_tokenizer(model), mm.image_transform(model, train=False)


# ------------------------------------------------------------------------------------------------ evaluation
def test_samples(a, limit=None):
    import webdataset as wds

    ds = wds.WebDataset(a.test_urls, shardshuffle=False).decode("pilrgb").to_tuple("jpg", "cls")
    for i, (img, label) in enumerate(ds):
        if limit is not None and i >= limit:
            return
        yield img, int(label)


def zeroshot(a, model, tokenizer, preprocess, batch=500) -> dict:
    """Top-1 / top-5 (%) on the test set for any model with ``encode_image`` / ``encode_text(x, normalize=True)``."""
    import open_clip
    import torch

    model.eval()
    hits1 = hits5 = n = 0
    with torch.no_grad():
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, a.info["classes"], a.templates)
        samples = iter(test_samples(a))
        while chunk := [s for _, s in zip(range(batch), samples)]:
            feats = model.encode_image(torch.stack([preprocess(img) for img, _ in chunk]), normalize=True)
            top5 = (feats @ classifier).topk(5, dim=1).indices
            y = torch.tensor([label for _, label in chunk])[:, None]
            hits1 += (top5[:, :1] == y).sum().item()
            hits5 += (top5 == y).any(dim=1).sum().item()
            n += len(chunk)
    return {"top1": 100.0 * hits1 / n, "top5": 100.0 * hits5 / n, "eval_samples": n}


def window_rates(step_t: dict, batch: int, every: int = 10) -> dict:
    """Median and best samples/s over windows of ``every`` steps, the first (startup) left out: the speed
    with the least interference when other processes share the machine. ``step_t``: {step: seconds}."""
    import statistics

    t = {int(k): v for k, v in step_t.items()}
    rates = [every * batch / (t[k + every] - t[k]) for k in range(every, max(t), every) if k + every in t]
    return {"window_median_sps": statistics.median(rates), "window_best_sps": max(rates)} if rates else {}


def checks(a, mm_side, oc_side, stats) -> dict:
    """Identical zero-shot inputs (tokens, first 256 test images) and learning rates on both sides."""
    import torch

    prompts = [t.format(c) for c in a.info["classes"] for t in a.templates]
    lr_oc = stats["open_clip"]["lr"]  # lr of every step, 0-based
    diffs = [abs(v - lr_oc[int(k)]) for k, v in stats["mm"]["lr_at"].items() if int(k) < len(lr_oc)]
    return {
        "tokens_equal": torch.equal(mm_side[1](prompts).long(), oc_side[1](prompts).long()),
        "images_equal": all(torch.equal(mm_side[2](i), oc_side[2](i)) for i, _ in test_samples(a, limit=256)),
        "lr_max_abs_diff": max(diffs) if diffs else None,
    }


# ------------------------------------------------------------------------------------------------------ main
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(a, res: dict) -> str:
    sides = [s for s in ("mm", "open_clip") if s in res]
    both = len(sides) == 2
    rows = [("zero-shot top-1 (%), this script's eval", "top1", ".2f"),
            ("zero-shot top-5 (%), this script's eval", "top5", ".2f"),
            ("zero-shot top-1 (%), trainer's own eval", "own_top1", ".2f"),
            ("optimizer steps done", "steps", "d"),
            ("training time (s)", "train_s", ".1f"),
            ("samples/s (steps x batch / time)", "samples_per_s", ".1f"),
            ("samples/s, median of 10-step windows", "window_median_sps", ".1f"),
            ("samples/s, best 10-step window", "window_best_sps", ".1f")]
    lines = ["| | " + " | ".join(sides) + " |" + (" mm / open_clip |" if both else ""),
             "|---|" + "---|" * (len(sides) + both)]
    for label, key, spec in rows:
        vals = [res[s].get(key) for s in sides]
        cells = [fmt(v, spec) for v in vals]
        if both:
            cells.append(f"{vals[0] / vals[1]:.3f}" if None not in vals and vals[1] and key != "steps" else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"{a.model} ({a.params:,} params), CIFAR-10 train {a.info['train']['samples']:,} / test "
              f"{a.info['test']['samples']:,}, batch {a.batch}, {a.steps} steps, AdamW lr {a.lr:g} betas (0.9, 0.98) "
              f"eps 1e-6 wd {a.wd:g}, warmup {a.warmup} + cosine to 0, fp32, grad clip {a.grad_clip or 'off'}, "
              f"{a.workers} workers, seed {a.seed}, {os.cpu_count()} CPUs; zero-shot: {len(a.templates)} templates "
              f"x {len(a.info['classes'])} classes."]
    loads = {s: (res[s].get("load_before", [0])[0], res[s].get("load_after", [0])[0]) for s in sides}
    lines.append("1-min load average before -> after training: "
                 + "; ".join(f"{s} {b:.1f} -> {e:.1f}" for s, (b, e) in loads.items()))
    if max(max(v) for v in loads.values()) > (os.cpu_count() or 1) + 0.5:
        lines.append("WARNING: other processes loaded the machine during training: the times are not comparable.")
    if "checks" in res:
        c = res["checks"]
        lines.append(f"Checks: identical eval tokens {c['tokens_equal']}, identical eval images {c['images_equal']}, "
                     f"max |lr difference| at mm's logged steps {fmt(c['lr_max_abs_diff'], '.2g')}.")
    if both and None not in (res["mm"].get("train_s"), res["open_clip"].get("train_s")):
        acc = res["mm"]["top1"] >= res["open_clip"]["top1"]
        fast = res["mm"]["train_s"] <= res["open_clip"]["train_s"]
        lines.append(f"mm at least as accurate: {'yes' if acc else 'NO'}; at least as fast: "
                     f"{'yes' if fast else 'NO'} (one seed, one run each).")
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    cfg_dir = write_open_clip_config(a)
    sides = [a.only] if a.only else ["open_clip", "mm"]
    stats, res, loaded = {}, {}, {}
    for side in sides:
        if a.eval_only:
            stats[side] = json.loads((a.out / side / "bench_stats.json").read_text())
            if side == "mm":  # mm's metrics may hold newer evaluation records than the stats
                stats[side].update(mm_stats(a.out / "mm"))
        else:
            stats[side] = train_open_clip(a, cfg_dir) if side == "open_clip" else train_mm(a)
    for side in sides:
        s = stats[side]
        loaded[side] = load_open_clip(a, cfg_dir, s) if side == "open_clip" else load_mm(s)
        t0 = time.perf_counter()
        res[side] = {**{k: v for k, v in s.items() if k not in ("lr", "lr_at", "step_t")},
                     **zeroshot(a, *loaded[side]), "eval_s": time.perf_counter() - t0,
                     **window_rates(s.get("step_t", {}), a.batch)}
        if s.get("train_s"):
            res[side]["samples_per_s"] = s["steps"] * a.batch / s["train_s"]
    if len(sides) == 2:
        res["checks"] = checks(a, loaded["mm"], loaded["open_clip"], stats)
    table = report(a, res)
    res["config"] = {k: v for k, v in vars(a).items() if k not in ("info", "out")}
    (a.out / "results.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    print(table)
    print(f"\nresults: {a.out / 'results.json'}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_peer"]:
        peer_main(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        main()
