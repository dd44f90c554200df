"""Image-embedding throughput: mm's embed pipeline vs a plain open_clip loop, on the same weights, images,
batch size, DataLoader workers and precision, in one process.

    python benchmarks/bench_infer.py --model ViT-B-32 --n 2048 --batch-size 256 --workers 8   # GPU
    python benchmarks/bench_infer.py --model ViT-B-32 --images ~/photos --batch-size 128      # your images
    python benchmarks/bench_infer.py --model tiny-clip --n 64 --workers 2 --repeats 1        # CPU smoke test

Images: ``--n`` JPEGs of ``--size`` x ``--size`` generated into a temporary folder, or every image under
``--images DIR``. mm: :func:`mm.embed.embed_images` end to end (workers decode and preprocess, bf16 autocast
on CUDA, fp32 on CPU, L2-normalised rows written as .npy chunks plus the index) into a fresh directory per
repeat. open_clip: ``open_clip.create_model(NAME)`` for open_clip-named presets (``open_clip.CLIP(
**open_clip_config(cfg))`` for tiny ones) holding mm's weights (``mm.to_open_clip``), open_clip's own eval
preprocess, a DataLoader with the same workers and batch size, ``encode_image(normalize=True)`` under the
same autocast, rows gathered into one array. Both timings include DataLoader start-up. Reports the
median images/s of ``--repeats`` interleaved runs, the ratio mm / open_clip, and the largest absolute
difference between the two sets of embeddings.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import mm
from mm.data.folder import list_images
from mm.embed import embed_images, load_index
from mm.interop.open_clip import open_clip_config


def make_images(folder: Path, n: int, size: int) -> None:
    """Smooth colour fields plus noise: JPEGs that cost a realistic amount to decode."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3))
        arr = np.stack([a[k] * xx + b[k] * yy + c[k] * xx * yy for k in range(3)], -1) / 2
        arr = np.clip(arr + rng.normal(0, 12, arr.shape), 0, 255).astype(np.uint8)
        Image.fromarray(arr, "RGB").save(folder / f"img_{i:06d}.jpg", quality=90)


def open_clip_model(model: mm.CLIP, name: str):
    import open_clip

    oc = open_clip.create_model(name) if name in open_clip.list_models() else \
        open_clip.CLIP(**open_clip_config(model.config))
    oc.load_state_dict(mm.to_open_clip(model), strict=True)
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


def timed(fn, n: int) -> tuple[float, object]:
    t0 = time.perf_counter()
    result = fn()
    return n / (time.perf_counter() - t0), result


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
    args = ap.parse_args()

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
        print(f"model {args.model}, {n} images from {folder}, batch {args.batch_size}, workers {args.workers}, "
              f"device {device}, precision {'bf16 autocast' if device.type == 'cuda' else 'fp32'}")
        speeds: dict[str, list[float]] = {"mm": [], "open_clip": []}
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            s, (emb_mm, ids) = timed(lambda: run_mm(model, folder, args, work), n)
            speeds["mm"].append(s)
            s, emb_oc = timed(lambda: run_open_clip(oc, pre, paths, args, device), n)
            speeds["open_clip"].append(s)
    if len(ids) != n:
        raise SystemExit(f"mm embedded {len(ids)} of {n} images (unreadable ones are skipped)")
    med = {k: statistics.median(v) for k, v in speeds.items()}
    for k, v in med.items():
        print(f"{k:10s} {v:9.1f} images/s  (median of {args.repeats}: {', '.join(f'{x:.1f}' for x in speeds[k])})")
    print(f"ratio mm / open_clip: {med['mm'] / med['open_clip']:.3f}")
    print(f"max |mm - open_clip| over {n} x {emb_mm.shape[1]} embedding values: "
          f"{np.abs(emb_mm.astype(np.float32) - emb_oc).max():.2e}")


if __name__ == "__main__":
    main()
