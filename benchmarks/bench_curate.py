"""DataComp's effect at small scale (issue 33, acceptance 1): a noisy image-text pool made from the shared Flickr8k and
CIFAR-10 data, and the table of what training on it whole, CLIP-score filtered and filtered + SemDeDup gives.
benchmarks/run_curate.sh runs the whole experiment; this file holds its two data steps.

``make-pool OUT``: two deterministic (seeded) shard sets from ../shared/datasets:

- ``OUT/clean/``: the reference model's training data, never in the pool: a seeded share of the Flickr8k training
  photos (``--ref-flickr``, with all five captions in ``json`` for ``data.random_caption``) and the first
  ``--ref-cifar`` samples of CIFAR-10's last training shard (train-0004, templated captions).
- ``OUT/pool/``: the other Flickr8k training photos (their ``txt`` caption) and the first ``--cifar`` samples of
  CIFAR-10's train-0000 (templated captions), corrupted: ``--shuffle`` of the samples get the caption of another
  one of them (a derangement, across both sources), ``--junk`` of the others a junk caption (random letter tokens,
  or one very short word such as "IMG_0412"), then ``--dups`` (a fraction of the samples above) near-duplicates
  are added: a resized (x0.8-0.95 or x1.05-1.2) and re-encoded (JPEG quality 65-90) copy of a pool sample, with its
  caption, under a new key. The pool is then shuffled (seeded) and numbered, so keys increase through the shards
  (``mm curate write`` needs that) and the shards mix sources. Members: ``jpg`` and ``txt`` only.

``OUT/pool_info.json`` (written last; its presence means the pool is done) records the counts of each corruption,
the shard specs, and every pool key's label (clean, shuffled, shuffled_same_class: a CIFAR caption moved to another
image of its class, i.e. still right; junk; dup) with each duplicate's original.

``table OUT``: the Markdown table of the runs (kept samples, steps, training time, CIFAR-10 zero-shot top-1, Flickr8k
retrieval recall@1/5 both ways) and what each filter removed of the planted corruption.

``speed --model M --data SHARDS``: acceptance 3, samples/s of ``mm curate score`` against ``mm embed`` (its images
run and its captions run) on the same model, shards, batch and workers, in one process, rounds interleaved.

    .venv/bin/python benchmarks/bench_curate.py make-pool benchmarks/runs/curate [--limit 300]
    .venv/bin/python benchmarks/bench_curate.py table benchmarks/runs/curate
    .venv/bin/python benchmarks/bench_curate.py speed --model benchmarks/runs/curate/runs/ref/final \
        --data 'benchmarks/runs/curate/pool/pool-{000000..000003}.tar'
"""
from __future__ import annotations

import argparse
import io
import json
import string
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mm.data.shards import ShardWriter
from mm.data.wds import check_urls, iter_shard

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "datasets"
SHORT_JUNK = ["img", "photo", "image", "untitled", "jpg", "pic", "1", "thumbnail", "IMG_{:04d}", "DSC{:05d}",
              "P{:07d}", "file{:03d}"]
SHARD_SIZE = 2000


def _read(spec: str, limit: int | None) -> list[dict]:
    out = []
    for url in check_urls(spec, "shards"):
        for s in iter_shard(url, print):
            out.append(s)
            if limit is not None and len(out) >= limit:
                return out
    return out


def _spec(out_dir: Path, info: dict) -> str:
    names = [s["name"] for s in info["shards"]]
    first, last = names[0], names[-1]
    prefix, ext = first.rsplit("-", 1)[0], first.split(".", 1)[1]
    lo, hi = first[len(prefix) + 1:].split(".")[0], last[len(prefix) + 1:].split(".")[0]
    return str(out_dir / f"{prefix}-{{{lo}..{hi}}}.{ext}") if lo != hi else str(out_dir / first)


def _junk(rng: np.random.Generator) -> str:
    if rng.random() < 0.5:  # random letter tokens
        words = ["".join(rng.choice(list(string.ascii_lowercase), int(rng.integers(2, 9))))
                 for _ in range(int(rng.integers(2, 7)))]
        return " ".join(words)
    word = SHORT_JUNK[int(rng.integers(len(SHORT_JUNK)))]
    return word.format(int(rng.integers(10_000_000))) if "{" in word else word


def _near_dup(jpg: bytes, rng: np.random.Generator) -> bytes:
    img = Image.open(io.BytesIO(jpg)).convert("RGB")
    f = float(rng.uniform(0.8, 0.95) if rng.random() < 0.5 else rng.uniform(1.05, 1.2))
    img = img.resize((max(8, round(img.width * f)), max(8, round(img.height * f))), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(65, 91)))
    return buf.getvalue()


def _write(out_dir: Path, prefix: str, samples: list[dict]) -> dict:
    """Samples (``jpg``, ``txt``, optional ``json`` bytes) as shards ``prefix-NNNNNN.tar`` keyed 0000000, 0000001..."""
    with ShardWriter(out_dir, prefix, samples_per_shard=SHARD_SIZE, verbose=False) as w:
        for i, s in enumerate(samples):
            extra = {"json": s["json"]} if "json" in s else None
            w.write(f"{i:07d}", s["jpg"], "jpg", caption=s["txt"], extra_members=extra)
        return w.close()


def make_pool(a: argparse.Namespace) -> None:
    out = Path(a.out)
    if (out / "pool_info.json").is_file():
        print(f"{out / 'pool_info.json'} exists: pool already made (delete {out} to make another)")
        return
    rng = np.random.default_rng(a.seed)
    lim = a.limit
    flickr = _read(str(DATA / "flickr8k" / "train-{0000..0003}.tar"), lim)
    cifar_pool = _read(str(DATA / "cifar10" / "train-0000.tar.gz"), min(a.cifar, lim or a.cifar))
    cifar_ref = _read(str(DATA / "cifar10" / "train-0004.tar.gz"), min(a.ref_cifar, lim or a.ref_cifar))

    # the reference's clean split: a seeded share of the Flickr photos (all five captions) + CIFAR train-0004
    order = rng.permutation(len(flickr))
    n_ref = int(round(a.ref_flickr * len(flickr)))
    ref_idx, pool_idx = sorted(order[:n_ref]), sorted(order[n_ref:])
    clean = [{"jpg": flickr[i]["jpg"], "txt": flickr[i]["txt"].decode().strip(), "json": flickr[i]["json"]}
             for i in ref_idx]
    clean += [{"jpg": s["jpg"], "txt": s["txt"].decode().strip()} for s in cifar_ref]
    clean = [clean[i] for i in rng.permutation(len(clean))]

    # the pool's originals: source, identity (photo or CIFAR class) and caption
    orig = [{"jpg": flickr[i]["jpg"], "txt": flickr[i]["txt"].decode().strip().splitlines()[0], "src": "flickr",
             "cls": None, "id": flickr[i]["__key__"]} for i in pool_idx]
    orig += [{"jpg": s["jpg"], "txt": s["txt"].decode().strip(), "src": "cifar", "cls": int(s["cls"]),
              "id": s["__key__"]} for s in cifar_pool]
    n = len(orig)
    for o in orig:
        o["label"] = "clean"
    # 1. shuffled captions: a derangement of the chosen samples' captions
    chosen = rng.permutation(n)[: int(round(a.shuffle * n))]
    perm = rng.permutation(len(chosen))
    for i in np.flatnonzero(perm == np.arange(len(chosen))):  # fixed points: swap with the next one
        j = (i + 1) % len(chosen)
        perm[i], perm[j] = perm[j], perm[i]
    captions = [orig[chosen[p]]["txt"] for p in perm]
    donors = [orig[chosen[p]] for p in perm]
    for k, i in enumerate(chosen):
        o, d = orig[i], donors[k]
        o["txt"] = captions[k]
        same = o["src"] == d["src"] == "cifar" and o["cls"] == d["cls"]
        o["label"] = "shuffled_same_class" if same else "shuffled"
    # 2. junk captions, among the samples not shuffled
    rest = np.setdiff1d(np.arange(n), chosen)
    for i in rng.permutation(rest)[: int(round(a.junk * n))]:
        orig[i]["txt"], orig[i]["label"] = _junk(rng), "junk"
    # 3. near-duplicates of pool samples (after the caption corruption: a copy carries its original's caption)
    dups = []
    for i in rng.choice(n, int(round(a.dups * n)), replace=False):
        o = orig[i]
        dups.append({**o, "jpg": _near_dup(o["jpg"], rng), "label": "dup", "dup_of": int(i)})
    pool = orig + dups
    order = rng.permutation(len(pool))
    pool = [pool[i] for i in order]
    key_of = {int(old): f"{new:07d}" for new, old in enumerate(order)}  # position in orig+dups -> key

    pool_dir, clean_dir = out / "pool", out / "clean"
    pool_info, clean_info = _write(pool_dir, "pool", pool), _write(clean_dir, "clean", clean)
    labels = {f"{k:07d}": s["label"] for k, s in enumerate(pool)}
    dup_of = {f"{k:07d}": key_of[s["dup_of"]] for k, s in enumerate(pool) if "dup_of" in s}
    counts = Counter(s["label"] for s in pool)
    info = {
        "seed": a.seed, "limit": lim,
        "sources": {"pool_flickr": "flickr8k/train-{0000..0003}.tar minus the reference's photos",
                    "pool_cifar": f"cifar10/train-0000.tar.gz, first {len(cifar_pool)}",
                    "clean_flickr": f"flickr8k/train-{{0000..0003}}.tar, seeded {a.ref_flickr:.0%} of the photos",
                    "clean_cifar": f"cifar10/train-0004.tar.gz, first {len(cifar_ref)}"},
        "counts": {"pool": len(pool), "originals": n, "flickr": len(pool_idx), "cifar": len(cifar_pool),
                   "shuffled": len(chosen), "shuffled_wrong": counts["shuffled"],
                   "shuffled_same_class": counts["shuffled_same_class"], "junk": counts["junk"],
                   "duplicates": len(dups), "clean_originals": counts["clean"],
                   "reference_flickr": len(ref_idx), "reference_cifar": len(cifar_ref), "reference": len(clean)},
        "fractions": {"shuffle": a.shuffle, "junk": a.junk, "dups": a.dups, "ref_flickr": a.ref_flickr},
        "pool_spec": _spec(pool_dir, pool_info), "clean_spec": _spec(clean_dir, clean_info),
        "labels": labels, "dup_of": dup_of,
    }
    (out / "pool_info.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps({k: info[k] for k in ("counts", "pool_spec", "clean_spec")}, indent=1))


def get(a: argparse.Namespace) -> None:
    """Print one field of pool_info.json (for the shell script)."""
    print(json.loads((Path(a.out) / "pool_info.json").read_text())[a.field])


# -- the table ----------------------------------------------------------------------------------------
RUNS = [("ref", "reference (clean split, not the pool)", None), ("a", "(a) whole pool", None),
        ("b", "(b) CLIP-score top fraction", "filter_top"), ("c", "(c) (b) + SemDeDup", "filter_top_dedup")]


def _run_row(out: Path, run: str, name: str, kept: int | str) -> str | None:
    d = out / "runs" / run
    if not (d / "eval.json").is_file():
        return None
    ev = json.loads((d / "eval.json").read_text())
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = max(r["step"] for r in recs)
    rates = [r["samples_per_s"] for r in recs if "samples_per_s" in r][1:]  # the first window holds start-up
    train_s = max((r["time"] for r in recs if "samples_per_s" in r), default=float("nan"))
    sps = f"{np.median(rates):.0f}" if rates else ""
    pct = lambda k: f"{100 * ev[k]:.2f}" if k in ev else ""  # noqa: E731
    return (f"| {name} | {kept} | {steps} | {train_s:.0f} | {sps} | {pct('zeroshot_top1')} | {pct('i2t_r1')} | "
            f"{pct('i2t_r5')} | {pct('t2i_r1')} | {pct('t2i_r5')} |")


def _removal(out: Path, info: dict, filt: str) -> list[str]:
    """What a filter removed, by planted label, and for SemDeDup how many planted duplicate pairs it split."""
    d = out / filt
    if not (d / "removed.tsv").is_file():
        return []
    labels, dup_of = info["labels"], info["dup_of"]
    removed = dict(line.split("\t") for line in (d / "removed.tsv").read_text().splitlines() if line)
    lines = []
    total = Counter(labels.values())
    by_rule: dict[str, Counter] = {}
    for key, rule in removed.items():
        by_rule.setdefault(rule, Counter())[labels[key]] += 1
    cols = ["clean", "shuffled", "shuffled_same_class", "junk", "dup"]
    lines.append(f"| {filt} rule | " + " | ".join(f"{c} removed (of {total[c]})" for c in cols) + " |")
    lines.append("| --- | " + " | ".join("---" for _ in cols) + " |")
    for rule, c in by_rule.items():
        lines.append(f"| {rule} | " + " | ".join(f"{c[x]} ({100 * c[x] / max(total[x], 1):.1f}%)" for x in cols)
                     + " |")
    if "semdedup" in by_rule:
        # planted pairs both members of which survived the rules before semdedup: did it remove one of them?
        before = {k for k in labels if removed.get(k) in (None, "semdedup")}
        pairs = [(k, o) for k, o in dup_of.items() if k in before and o in before]
        split = sum((removed.get(k) == "semdedup") != (removed.get(o) == "semdedup") for k, o in pairs)
        both = sum(removed.get(k) == "semdedup" and removed.get(o) == "semdedup" for k, o in pairs)
        in_pair = {k for p in pairs for k in p}
        gone = [k for k, r in removed.items() if r == "semdedup"]
        lines.append(f"\nSemDeDup: of {len(pairs)} planted pairs kept until then, {split} lost exactly one member "
                     f"(recall {100 * split / max(len(pairs), 1):.1f}%), {both} both; of its {len(gone)} removals "
                     f"{sum(k in in_pair for k in gone)} were in a planted pair (precision "
                     f"{100 * sum(k in in_pair for k in gone) / max(len(gone), 1):.1f}%; the rest: CIFAR's or "
                     "Flickr's own near-duplicates, or distinct images the reference cannot tell apart).")
    return lines


def table(a: argparse.Namespace) -> None:
    out = Path(a.out)
    info = json.loads((out / "pool_info.json").read_text())
    kept = {"ref": f"{info['counts']['reference']} (clean)", "a": info["counts"]["pool"]}
    for run, _, filt in RUNS:
        if filt and (out / filt / "report.json").is_file():
            kept[run] = json.loads((out / filt / "report.json").read_text())["kept"]
    print("| run | kept samples | steps | train s | samples/s | CIFAR-10 top-1 % | Flickr8k image->text R@1 % | "
          "R@5 % | text->image R@1 % | R@5 % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for run, name, _ in RUNS:
        row = _run_row(out, run, name, kept.get(run, ""))
        print(row if row else f"| {name} | {kept.get(run, '')} | (not run yet) | | | | | | | |")
    c = info["counts"]
    print(f"\nPool: {c['pool']} samples = {c['flickr']} Flickr8k + {c['cifar']} CIFAR-10 originals "
          f"({c['shuffled']} captions shuffled, {c['shuffled_same_class']} of them onto an image of the same CIFAR "
          f"class; {c['junk']} junk captions) + {c['duplicates']} near-duplicates. Reference: {c['reference']} "
          f"clean samples ({c['reference_flickr']} Flickr8k photos with five captions, {c['reference_cifar']} "
          "CIFAR-10).")
    for _, _, filt in RUNS:
        if filt:
            lines = _removal(out, info, filt)
            if lines:
                print()
                print("\n".join(lines))


def speed(a: argparse.Namespace) -> None:
    """Acceptance 3: `mm curate score` against `mm embed` on the same model and shards, in one process (the model
    loaded once), rounds interleaved (embed images, embed captions, curate score; each into a fresh directory, so
    nothing resumes), the same batch size and DataLoader workers. samples/s counts the pool's samples for every
    command; the figure of merit is curate score's samples/s over that of getting the same two embeddings from
    `mm embed` (its images run plus its captions run); over the images run alone too, the stricter one."""
    import shutil
    import tempfile
    import time

    import torch

    from mm.hub import load_model
    from mm.inference.curate import plan_pool, run_score
    from mm.inference.embed import plan_images, plan_texts, run_embed
    from mm.utils.host import default_workers

    torch.set_num_threads(a.threads or torch.get_num_threads())
    model = load_model(a.model, None, "cpu")
    workers = default_workers() if a.workers is None else a.workers
    kw = dict(batch_size=a.batch_size, workers=workers)
    n = len(plan_texts(a.data, 10**9)[0].items)
    tmp = Path(tempfile.mkdtemp(prefix="curate_speed_"))
    jobs = {"embed images": lambda d: run_embed(model, plan_images([a.data], 4096), d, **kw),
            "embed captions": lambda d: run_embed(model, plan_texts(a.data, 4096), d, **kw),
            "curate score": lambda d: run_score(model, plan_pool(a.data), d, **kw)}
    times: dict[str, list[float]] = {k: [] for k in jobs}
    print(f"{a.model}: {n} samples of {a.data}, batch {a.batch_size}, {workers} workers, "
          f"{torch.get_num_threads()} threads, {a.repeats} rounds", flush=True)
    try:
        for r in range(a.repeats):
            for name, job in jobs.items():
                d = tmp / f"{r}-{name.replace(' ', '_')}"
                t0 = time.perf_counter()
                job(d)
                times[name].append(time.perf_counter() - t0)
                shutil.rmtree(d)
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    best = {k: min(v) for k, v in times.items()}
    rate = {k: n / t for k, t in best.items()}
    both = n / (best["embed images"] + best["embed captions"])
    print(f"\nbest of {a.repeats} rounds, samples/s:")
    for k in jobs:
        print(f"  {k:<15} {rate[k]:8.1f}  (median {np.median(times[k]):.2f} s, best {best[k]:.2f} s)")
    print(f"  embed both      {both:8.1f}  (images + captions runs)")
    print(f"curate score / embed both: {rate['curate score'] / both:.3f}x; "
          f"/ embed images alone: {rate['curate score'] / rate['embed images']:.3f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-pool", help="the noisy pool and the reference's clean split")
    m.add_argument("out")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--cifar", type=int, default=10_000, help="CIFAR-10 samples in the pool (from train-0000)")
    m.add_argument("--ref-cifar", type=int, default=5_000, help="CIFAR-10 samples of the clean split (train-0004)")
    m.add_argument("--ref-flickr", type=float, default=0.35, help="share of the Flickr8k photos in the clean split")
    m.add_argument("--shuffle", type=float, default=0.4, help="fraction of the originals whose captions are shuffled")
    m.add_argument("--junk", type=float, default=0.05, help="fraction of the originals given a junk caption")
    m.add_argument("--dups", type=float, default=0.1, help="near-duplicates added, a fraction of the originals")
    m.add_argument("--limit", type=int, default=None, help="read at most N samples of each source (a quick check)")
    m.set_defaults(fn=make_pool)
    g = sub.add_parser("get", help="print a field of OUT/pool_info.json")
    g.add_argument("out")
    g.add_argument("field")
    g.set_defaults(fn=get)
    t = sub.add_parser("table", help="the Markdown tables of the runs and filters")
    t.add_argument("out")
    t.set_defaults(fn=table)
    s = sub.add_parser("speed", help="samples/s of mm curate score against mm embed (images, captions)")
    s.add_argument("--model", required=True, help="a model directory or open_clip:NAME[:TAG] spec")
    s.add_argument("--data", required=True, help="webdataset shards (one caption a sample: txt)")
    s.add_argument("--batch-size", type=int, default=128)
    s.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the commands' default)")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--repeats", type=int, default=3)
    s.set_defaults(fn=speed)
    a = p.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
