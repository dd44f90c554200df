"""Training data throughput from JPEG shards: decoding in the DataLoader workers (PIL) vs on the training
device (``data.decode: device``: workers read headers and draw crops, the main process decodes the batch
with torchvision's decode_jpeg, nvJPEG on CUDA, and crops/resizes there).

    python benchmarks/bench_data.py --shards '../shared/datasets/flickr8k/train-{0000..0003}.tar' \\
        --image-size 224 --batch 256 --workers 16 --batches 20
    # GPU, end to end (issue 7: training from JPEG shards at >= 90% of the synthetic-data step rate):
    python benchmarks/bench_data.py --make-shards /tmp/jpegs --n 16384 --shards '/tmp/jpegs/train-{000000..000015}.tar' \\
        --batch 512 --workers 15 --batches 20 --train ViT-B-32

``--make-shards DIR`` first writes ``--n`` photo-like 500x375 JPEGs (quality 90, smooth structure plus
grain, ~60 KB like Flickr photos) with captions into DIR (1,024 per shard); a machine without the data sets
can then run the benchmark. ``--train MODEL`` runs a full training step (bf16 autocast on CUDA, fused
AdamW, CLIP loss) on every batch and compares the rate with the same steps on one batch already on the
device (the synthetic-data rate): ``end to end / synthetic`` is what the data path costs training.

Both paths run the real training pipeline (ShardStream, shuffling, tokenization, RandomResizedCrop);
the clock starts after the first batch (worker start-up) and stops when the last batch's images are
on the device, normalised. Reports images/s for each and the ratio. On a CPU machine "device" means the
main process decodes with libjpeg-turbo through torchvision, so the CPU ratio says little about a GPU.
"""
from __future__ import annotations

import argparse
import time

import torch

import mm
from mm.data.decode import SampleDecoder
from mm.data.gpu import DeferredTrainTransform, GpuImageDecoder, PendingImages
from mm.data.wds import Collate, ShardStream, check_urls, make_loader


def run(path: str, args, device: torch.device, trainer: Trainer | None = None, keep: list | None = None) -> float:
    cfg = mm.get_preset(args.model)
    cfg.vision.image_size = args.image_size
    transform = mm.image_transform(cfg, train=True)
    on_device = path == "device"
    if on_device:
        transform = DeferredTrainTransform(transform, max_pixels=89_478_485)
    decoder = SampleDecoder(transform, image_keys=["jpg", "jpeg", "png", "webp"], need=("text",), raw_image=on_device)
    stream = ShardStream(check_urls(args.shards, "--shards"), decoder, Collate(mm.get_tokenizer(args.model)),
                         args.batch, seed=0, shuffle_buffer=1000, train=True)
    loader = make_loader(stream, args.workers, pin_memory=device.type == "cuda")
    gpu = GpuImageDecoder(args.image_size, cfg.vision.image_mean, cfg.vision.image_std)
    it = iter(loader)
    n, t0 = 0, None
    for i in range(args.batches + 1):
        batch = next(it)
        images = batch["images"]
        images = gpu(images, device) if isinstance(images, PendingImages) else images.to(device, non_blocking=True)
        if trainer is not None:
            trainer(images, batch["tokens"].to(device, non_blocking=True))
            if keep is not None and not keep:
                keep.append({"images": images, "tokens": batch["tokens"]})
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            t0 = time.perf_counter()  # after start-up: workers spawned, first shards open
        else:
            n += images.shape[0]
    return n / (time.perf_counter() - t0)


def _photo_jpeg(i: int) -> bytes:
    """Photo-like 500x375 JPEG number ``i``: low-frequency colour structure (an upsampled 8x6 grid) plus
    per-pixel grain, about the size (~55 KB at quality 90) and decode cost of a Flickr photo."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(i)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((500, 375), Image.BICUBIC)
    arr = np.asarray(base, dtype=np.int16) + rng.integers(-12, 13, (375, 500, 3), dtype=np.int16)
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(out: str, n: int) -> None:
    """``n`` photo-like JPEGs with 10-word captions as shards of 1,024 in ``out`` (drawn on all cores)."""
    import multiprocessing as mp
    import os

    from mm.data.shards import ShardWriter

    words = "a dog cat man woman child runs sits on the grass beach street near water with ball red blue".split()
    with mp.get_context("spawn").Pool(os.cpu_count()) as pool, \
            ShardWriter(out, "train", samples_per_shard=1024, verbose=False) as w:
        for i, jpeg in enumerate(pool.imap(_photo_jpeg, range(n), chunksize=64)):
            w.write(f"{i:08d}", jpeg, "jpg", caption=" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(10)))
        w.close()


class Trainer:
    """A training step of ``model`` (bf16 autocast on CUDA, fused AdamW there, CLIP loss) per batch."""

    def __init__(self, model: str, image_size: int, device: torch.device):
        cfg = mm.get_preset(model)
        cfg.vision.image_size = image_size
        self.model = mm.create_model(cfg).to(device).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.loss = mm.ClipLoss()
        self.device = device
        self.dtype = torch.bfloat16 if device.type == "cuda" else None

    def __call__(self, images: torch.Tensor, tokens: torch.Tensor) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.loss(self.model(images, tokens))["loss"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def synthetic_rate(trainer: Trainer, batch: dict, device: torch.device, steps: int) -> float:
    """Samples/s of the same steps on one batch already on the device: the data path's ceiling."""
    images, tokens = batch["images"].to(device), batch["tokens"].to(device)
    trainer(images, tokens)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer(images, tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * images.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--model", default="ViT-B-32", help="preset (for normalisation and the tokenizer)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=10, help="timed batches per path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--make-shards", metavar="DIR", help="first write --n photo-like JPEGs as shards into DIR")
    p.add_argument("--n", type=int, default=16384, help="images for --make-shards")
    p.add_argument("--train", metavar="MODEL", help="run a training step of this preset on every batch")
    args = p.parse_args()
    device = torch.device(args.device)
    args.model = args.train or args.model  # the trained model's normalisation and tokenizer
    if args.make_shards:
        t0 = time.perf_counter()
        make_shards(args.make_shards, args.n)
        print(f"wrote {args.n} JPEGs to {args.make_shards} in {time.perf_counter() - t0:.0f} s")
    trainer = Trainer(args.train, args.image_size, device) if args.train else None
    keep: list = []
    rates = {path: run(path, args, device, trainer, keep) for path in ("workers", "device")}
    print(f"{args.shards}: {args.image_size} px, batch {args.batch}, {args.workers} workers, {device}, "
          f"torch {torch.__version__}" + (f", training {args.train} on every batch" if trainer else ""))
    what = "samples/s end to end" if trainer else "images/s"
    for path, r in rates.items():
        print(f"decode in {path:8s} {r:8.1f} {what}")
    print(f"device / workers: {rates['device'] / rates['workers']:.2f}")
    if trainer is not None:
        syn = synthetic_rate(trainer, keep[0], device, args.batches)
        print(f"synthetic (one batch on the device) {syn:8.1f} samples/s; end to end / synthetic: "
              + ", ".join(f"{path} {r / syn:.2f}" for path, r in rates.items()) + " (target >= 0.90)")


if __name__ == "__main__":
    main()
