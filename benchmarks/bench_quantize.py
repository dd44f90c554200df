"""int8 quantization on real images: embedding agreement with fp32, zero-shot accuracy, CPU throughput.

    python benchmarks/bench_quantize.py                    # the CIFAR-10 tiny-clip of bench_learning.py
    python benchmarks/bench_quantize.py --model runs/x/final --shards 'data/test-{0000..0003}.tar' --max-samples 2000
    python benchmarks/bench_quantize.py --throughput-only --model ViT-B-32 --batch-size 16   # random weights

For ``fp32``, ``int8`` (dynamic: ``mm.quantize(model, "int8")``) and ``int8-weight`` (weight-only), on the
labelled test shards (mm's eval preprocessing): the cosine similarity of each image's int8 embedding to its fp32
embedding (min / mean / 1st percentile), the same for the zero-shot class embeddings, and zero-shot top-1 / top-5
with each model's own classifier (its text tower quantized too; class names from the shards' info.json,
templates from ``--templates``). Throughput: ``encode_image`` on one preprocessed batch, the three models
interleaved for ``--repeats`` rounds, median images/s and the ratio to fp32 (model compute only, no decoding).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import mm
from mm.data.decode import SampleDecoder
from mm.data.wds import Collate, ShardStream, check_urls, make_loader
from mm.eval.zeroshot import load_names

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32", "int8", "int8-weight")


def variants(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {"fp32": model, "int8": mm.quantize(model, "int8"), "int8-weight": mm.quantize(model, "int8-weight")}


def accuracy(models: dict, urls: list[str], classnames: list[str], templates: list[str], batch_size: int,
             max_samples: int | None, workers: int) -> dict:
    base = models["fp32"]
    tok = mm.get_tokenizer(base)
    classifiers = {k: mm.zero_shot_classifier(m, tok, classnames, templates) for k, m in models.items()}
    decoder = SampleDecoder(mm.image_transform(base, train=False), image_keys=["jpg", "png"], need=("label",))
    stream = ShardStream(urls, decoder, Collate(), batch_size, train=False, max_samples=max_samples)
    correct = {k: [0, 0] for k in models}
    cos = {k: [] for k in models if k != "fp32"}
    n = 0
    with torch.inference_mode():
        for b in make_loader(stream, workers):
            if "images" not in b:
                continue
            labels = b["labels"]
            embs = {k: m.encode_image(b["images"], normalize=True) for k, m in models.items()}
            for k, e in embs.items():
                top5 = (e @ classifiers[k]).topk(5, dim=-1).indices
                correct[k][0] += (top5[:, 0] == labels).sum().item()
                correct[k][1] += (top5 == labels[:, None]).any(-1).sum().item()
                if k != "fp32":
                    cos[k].append(F.cosine_similarity(e, embs["fp32"], dim=-1))
            n += len(labels)
    out = {"n": n}
    for k in models:
        out[k] = {"top1": 100 * correct[k][0] / n, "top5": 100 * correct[k][1] / n}
        if k != "fp32":
            c = torch.cat(cos[k])
            cls = F.cosine_similarity(classifiers[k], classifiers["fp32"], dim=0)
            out[k].update(image_cos_min=c.min().item(), image_cos_mean=c.mean().item(),
                          image_cos_p01=c.quantile(0.01).item(), class_cos_min=cls.min().item())
    return out


def throughput(models: dict, size: int, batch_size: int, repeats: int) -> dict:
    x = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0))
    times = {k: [] for k in models}
    with torch.inference_mode():
        for m in models.values():
            m.encode_image(x)  # warm-up
        for _ in range(repeats):
            for k, m in models.items():  # interleaved: load changes hit all three alike
                t0 = time.perf_counter()
                m.encode_image(x)
                times[k].append(time.perf_counter() - t0)
    ips = {k: batch_size / statistics.median(v) for k, v in times.items()}
    return {k: {"images_per_s": ips[k], "ratio_to_fp32": ips[k] / ips["fp32"]} for k in models}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "benchmarks/runs/learning-run1/mm/final"))
    p.add_argument("--pretrained", default=None)
    p.add_argument("--shards", default=str(ROOT.parent / "shared/datasets/cifar10/test-0000.tar.gz"))
    p.add_argument("--templates", default=str(ROOT / "benchmarks/cifar10_zeroshot_templates.txt"))
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--throughput-only", action="store_true")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    model = mm.load_model(args.model, args.pretrained, warn_random=not args.throughput_only)
    models = variants(model)
    res: dict = {"model": args.model, "threads": torch.get_num_threads(),
                 "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "torch": torch.__version__,
                 "quantized_engine": torch.backends.quantized.engine}
    if not args.throughput_only:
        urls = check_urls(args.shards, "--shards")
        info = json.loads((Path(urls[0]).parent / "info.json").read_text())
        res["accuracy"] = accuracy(models, urls, info["classes"], load_names(args.templates, "templates"),
                                   args.batch_size, args.max_samples, args.workers)
    res["throughput"] = throughput(models, model.config.vision.image_size, args.batch_size, args.repeats)
    res["throughput"]["batch_size"] = args.batch_size
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
