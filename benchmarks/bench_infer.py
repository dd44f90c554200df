"""Image-embedding throughput: mm's embed pipeline vs a plain open_clip loop, on the same weights, images,
batch size, DataLoader workers and precision.

    python benchmarks/bench_infer.py --model ViT-B-32 --n 2048 --batch-size 256 --workers 8   # GPU
    python benchmarks/bench_infer.py --model ViT-B-32 --images ~/photos --batch-size 128      # your images
    python benchmarks/bench_infer.py --model tiny-clip --n 64 --workers 2 --repeats 1        # CPU smoke test
    python benchmarks/bench_infer.py --model ViT-B-32 --n 256 --workers 2 --batch-size 32 --processes

Images: ``--n`` JPEGs of ``--size`` x ``--size`` generated into a temporary folder, or every image under
``--images DIR``. mm: :func:`mm.inference.embed.embed_images` end to end (workers decode and preprocess, bf16 autocast
on CUDA, fp32 on CPU, L2-normalised rows written as .npy chunks plus the index) into a fresh directory per
repeat. open_clip: ``open_clip.create_model(NAME)`` for open_clip-named presets (``open_clip.CLIP(
**open_clip_config(cfg))`` for tiny ones) holding mm's weights (``mm.to_open_clip``), open_clip's own eval
preprocess, a DataLoader with the same workers and batch size, ``encode_image(normalize=True)`` under the
same autocast, rows gathered into one array. Both timings include DataLoader start-up. Reports the
median images/s of ``--repeats`` interleaved runs, the ratio mm / open_clip, the main process's minor page
faults per image (host allocator behaviour, see mm/utils/host.py) and the largest absolute difference between the
two sets of embeddings.

Default: both in this one process, with the allocator as it is (``--tune-malloc``: both with mm's allocator
settings), so the two differ only in their pipeline and model code. ``--processes``: each repeat runs the
two as users run them, each in a fresh process: the ``mm embed`` command (which applies mm/utils/host.py's
allocator settings to its process) and a plain open_clip loop (this file with ``--open-clip-loop``, allocator
untouched); each process times its own embedding run, from DataLoader start-up to the last row, so interpreter
start-up and model loading are not counted.
"""
from __future__ import annotations

import argparse
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import mm
import mm.utils.host
from mm.data.folder import list_images
from mm.hub.open_clip import open_clip_config
from mm.inference.embed import embed_images, load_index


def make_images(folder: Path, n: int, size: int) -> None:
    """Smooth colour fields plus noise: JPEGs that cost a realistic amount to decode."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        arr = np.stack([a[k] * xx + b[k] * yy + c[k] * xx * yy for k in range(3)], -1) / 2
        arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"img_{i:06d}.jpg", quality=90)


def open_clip_model(model: mm.CLIP, name: str, state: dict | None = None):
    import open_clip

    oc = open_clip.create_model(name) if name in open_clip.list_models() else \
        open_clip.CLIP(**open_clip_config(model.config))
    oc.load_state_dict(mm.to_open_clip(model) if state is None else state, strict=True)
    return oc.eval()


class Files(Dataset):
    def __init__(self, paths: list[Path], preprocess):
        self.paths, self.preprocess = paths, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(Image.open(self.paths[i]).convert("RGB"))


def open_clip_preprocess(model: mm.CLIP):
    """open_clip's eval transform; ``open_clip.CLIP(**cfg)`` records no mean/std, so they come from the config."""
    import open_clip

    v = model.config.vision
    return open_clip.image_transform(v.image_size, is_train=False, mean=v.image_mean, std=v.image_std)


def run_open_clip(oc, pre, paths: list[Path], args, device: torch.device) -> np.ndarray:
    loader = DataLoader(Files(paths, pre), batch_size=args.batch_size, num_workers=args.workers,
                        pin_memory=device.type == "cuda")
    autocast = torch.autocast(device.type, torch.bfloat16) if device.type == "cuda" else nullcontext()
    out = []
    with torch.inference_mode(), autocast:
        for x in loader:
            out.append(oc.encode_image(x.to(device, non_blocking=True), normalize=True).float().cpu())
    return torch.cat(out).numpy()


def run_mm(model: mm.CLIP, folder: Path, args, work: Path) -> tuple[np.ndarray, list[str]]:
    out = Path(tempfile.mkdtemp(dir=work))  # a fresh directory: an existing one would be resumed, not redone
    embed_images(model, [folder], out, batch_size=args.batch_size, workers=args.workers)
    return load_index(out)


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn, n: int, fault_log: list[float]) -> tuple[float, object]:
    f0, t0 = faults(), time.perf_counter()
    result = fn()
    speed = n / (time.perf_counter() - t0)
    fault_log.append((faults() - f0) / n)
    return speed, result


def save_models(model: mm.CLIP, oc, work: Path) -> tuple[Path, Path]:
    mm.save_pretrained(model, work / "mm_model")
    torch.save(oc.state_dict(), work / "open_clip.pt")
    return work / "mm_model", work / "open_clip.pt"


def run_process(cmd: list[str], pattern: str) -> float:
    """Run ``cmd``; returns the seconds its output reports (``pattern``'s group 1)."""
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    m = re.search(pattern, r.stdout + r.stderr)
    if r.returncode or m is None:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stdout}{r.stderr}")
    return float(m.group(1))


def open_clip_loop(args) -> None:
    """The open_clip side of ``--processes``: a fresh process, allocator untouched."""
    device = torch.device(args.device)
    model = mm.load_pretrained(args.model) if Path(args.model).is_dir() else mm.create_model(args.model)
    oc = open_clip_model(model, args.model, torch.load(args.open_clip_loop, weights_only=True)).to(device)
    paths = sorted(list_images([args.images]), key=lambda p: p.relative_to(args.images).as_posix())
    t0 = time.perf_counter()
    emb = run_open_clip(oc, open_clip_preprocess(model), paths, args, device)
    print(f"open_clip loop: {time.perf_counter() - t0:.3f} s")
    if args.save:
        np.save(args.save, emb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-32", help="preset name (random weights, seed 0) or mm model directory")
    ap.add_argument("--images", type=Path, help="a folder of images (default: generate --n JPEGs)")
    ap.add_argument("--n", type=int, default=512, help="images to generate")
    ap.add_argument("--size", type=int, default=256, help="generated image side")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tune-malloc", action="store_true", help="in-process: apply mm/utils/host.py's settings to both")
    ap.add_argument("--processes", action="store_true",
                    help="each side in its own fresh process: the mm embed command vs a plain open_clip loop")
    ap.add_argument("--open-clip-loop", type=Path, help=argparse.SUPPRESS)  # internal: the --processes peer
    ap.add_argument("--save", type=Path, help=argparse.SUPPRESS)  # internal: where the peer writes its rows
    args = ap.parse_args()
    if args.open_clip_loop:
        return open_clip_loop(args)
    if args.tune_malloc and not mm.utils.host.tune_malloc():
        raise SystemExit("--tune-malloc: mm.utils.host.tune_malloc() does not apply here "
                         "(not glibc, or MM_TUNE_MALLOC=0)")

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = (mm.load_pretrained(args.model) if Path(args.model).is_dir() else mm.create_model(args.model)).eval()
    oc, pre = open_clip_model(model, args.model).to(device), open_clip_preprocess(model)
    model.to(device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folder = args.images
        if folder is None:
            folder = work / "images"
            folder.mkdir()
            make_images(folder, args.n, args.size)
        paths = sorted(list_images([folder]), key=lambda p: p.relative_to(folder).as_posix())  # mm's id order
        n = len(paths)
        how = ("each in its own process (mm embed command / plain open_clip loop)" if args.processes else
               f"in one process, allocator {'tuned (mm/utils/host.py)' if args.tune_malloc else 'as is'}")
        print(f"model {args.model}, {n} images from {folder}, batch {args.batch_size}, workers {args.workers}, "
              f"device {device}, precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}, {how}")
        speeds: dict[str, list[float]] = {"mm": [], "open_clip": []}
        fault_log: dict[str, list[float]] = {"mm": [], "open_clip": []}
        if args.processes:
            model_dir, oc_file = save_models(model, oc, work)
            for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
                out = Path(tempfile.mkdtemp(dir=work))
                common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers), "--device", args.device]
                t = run_process([sys.executable, "-m", "mm.cli", "embed", "--model", str(model_dir), "--images",
                                 str(folder), "--out", str(out / "emb"), *common], r"parts, ([0-9.]+) s;")
                speeds["mm"].append(n / t)
                t = run_process([sys.executable, __file__, "--open-clip-loop", str(oc_file), "--model", args.model,
                                 "--images", str(folder), "--save", str(out / "oc.npy"), *common],
                                r"open_clip loop: ([0-9.]+) s")
                speeds["open_clip"].append(n / t)
            emb_mm, ids = load_index(out / "emb")
            emb_oc = np.load(out / "oc.npy")
        else:
            for _ in range(args.repeats):
                s, (emb_mm, ids) = timed(lambda: run_mm(model, folder, args, work), n, fault_log["mm"])
                speeds["mm"].append(s)
                s, emb_oc = timed(lambda: run_open_clip(oc, pre, paths, args, device), n, fault_log["open_clip"])
                speeds["open_clip"].append(s)
    if len(ids) != n:
        raise SystemExit(f"mm embedded {len(ids)} of {n} images (unreadable ones are skipped)")
    med = {k: statistics.median(v) for k, v in speeds.items()}
    for k, v in med.items():
        faults_note = f", {statistics.median(fault_log[k]):.0f} page faults/image" if fault_log[k] else ""
        print(f"{k:10s} {v:9.1f} images/s  (median of {args.repeats}: {', '.join(f'{x:.1f}' for x in speeds[k])})"
              f"{faults_note}")
    print(f"ratio mm / open_clip: {med['mm'] / med['open_clip']:.3f}")
    print(f"max |mm - open_clip| over {n} x {emb_mm.shape[1]} embedding values: "
          f"{np.abs(emb_mm.astype(np.float32) - emb_oc).max():.2e}")


if __name__ == "__main__":
    main()
