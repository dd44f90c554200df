"""Evaluation during and after training: zero-shot classification and image-text retrieval on shards."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..data.decode import SampleDecoder
from ..data.transforms import image_transform
from ..data.wds import Collate, ShardStream, check_urls, is_local, make_loader
from ..eval.captioning import caption_eval
from ..eval.retrieval import retrieval_eval
from ..eval.zeroshot import eval_mode, load_names, zero_shot_classifier, zero_shot_eval
from ..tokenizer import get_tokenizer
from .config import RunConfig


def shard_info(urls: list[str]) -> dict[str, Any]:
    """The ``info.json`` beside local shards ({} if none): class names, zero-shot templates."""
    if not urls or not is_local(urls[0]):
        return {}
    path = Path(urls[0].removeprefix("file://")).parent / "info.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def eval_batches(cfg: RunConfig, model, urls: list[str], need: tuple[str, ...], label_key: str = "cls",
                 max_samples: int | None = None, on_meta=None):
    """Batches of decoded samples from ``urls``; ``on_meta(meta)`` sees every batch's report (skipped
    samples by name and reason, warnings), including a final report that comes without samples."""
    decoder = SampleDecoder(image_transform(model, train=False), image_keys=cfg.data.image_keys,
                            text_key=cfg.data.text_key, label_key=label_key, need=need,
                            max_pixels=cfg.data.max_pixels)
    stream = ShardStream(urls, decoder, Collate(), cfg.eval.batch_size, train=False, max_samples=max_samples)
    for b in make_loader(stream, cfg.data.workers, cfg.data.prefetch_factor):
        if on_meta is not None:
            on_meta(b["meta"])
        if "images" in b:
            yield b


def evaluate(cfg: RunConfig, model, device: torch.device) -> dict[str, Any]:
    """Zero-shot top-1/top-5, retrieval recall@1/5/10 and caption BLEU-4 / CIDEr, for the shard sets
    configured in ``cfg.eval``. Captions are written to ``output_dir/captions.jsonl``; the first
    ``eval.captioning.show`` are returned under ``caption_examples``."""
    tok = get_tokenizer(model)
    results: dict[str, Any] = {}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    with eval_mode(model):  # restores every module's mode (frozen towers stay in eval mode)
        zs = cfg.eval.zeroshot
        if zs.shards:
            urls = check_urls(zs.shards, "eval.zeroshot.shards")
            info = shard_info(urls)
            classnames = load_names(zs.classnames if zs.classnames is not None else info.get("classes"),
                                    "classnames")
            templates = zs.templates if zs.templates is not None else info.get("templates")
            templates = load_names(templates, "templates") if templates is not None else None
            W = zero_shot_classifier(model, tok, classnames, templates, device=device)
            loader = eval_batches(cfg, model, urls, ("label",), zs.label_key, zs.max_samples)
            r = zero_shot_eval(model, W, ((b["images"], b["labels"]) for b in loader), device=device,
                               autocast_dtype=dtype)
            results.update(zeroshot_top1=r["zeroshot_top1"], zeroshot_top5=r["zeroshot_top5"], zeroshot_n=r["n"])
        rt = cfg.eval.retrieval
        if rt.shards:
            urls = check_urls(rt.shards, "eval.retrieval.shards")
            loader = eval_batches(cfg, model, urls, ("captions",), max_samples=rt.max_samples)
            r = retrieval_eval(model, tok, ((b["images"], b["captions"]) for b in loader), device=device,
                               autocast_dtype=dtype)
            results.update({k: v for k, v in r.items() if k.startswith(("i2t", "t2i"))})
        cp = cfg.eval.captioning
        if cp.shards:
            urls = check_urls(cp.shards, "eval.captioning.shards")
            loader = eval_batches(cfg, model, urls, ("captions",), max_samples=cp.max_samples)
            r = caption_eval(model, tok, ((b["images"], b["captions"], b["keys"]) for b in loader), cp.generation,
                             device=device, autocast_dtype=dtype)
            rows = r.pop("captions")
            with open(Path(cfg.output_dir) / "captions.jsonl", "w") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
            results.update(caption_bleu4=r["caption_bleu4"], caption_cider=r["caption_cider"], caption_n=r["caption_n"])
            results["caption_examples"] = rows[: cp.show]
    return results
