"""Training data throughput from JPEG shards: decoding in the DataLoader workers (PIL) vs on the training
device (``data.decode: device``: workers read headers and draw crops, the main process decodes the batch
with torchvision's decode_jpeg, nvJPEG on CUDA, and crops/resizes there).

    python benchmarks/bench_data.py --shards '../shared/datasets/flickr8k/train-{0000..0003}.tar' \\
        --image-size 224 --batch 256 --workers 16 --batches 20

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


def run(path: str, args, device: torch.device) -> float:
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
        images = next(it)["images"]
        images = gpu(images, device) if isinstance(images, PendingImages) else images.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i == 0:
            t0 = time.perf_counter()  # after start-up: workers spawned, first shards open
        else:
            n += images.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True)
    p.add_argument("--model", default="ViT-B-32", help="preset (for normalisation and the tokenizer)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batches", type=int, default=10, help="timed batches per path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    rates = {path: run(path, args, device) for path in ("workers", "device")}
    print(f"{args.shards}: {args.image_size} px, batch {args.batch}, {args.workers} workers, {device}, "
          f"torch {torch.__version__}")
    for path, r in rates.items():
        print(f"decode in {path:8s} {r:8.1f} images/s")
    print(f"device / workers: {rates['device'] / rates['workers']:.2f}")


if __name__ == "__main__":
    main()
