"""Evaluation on shard sets, during training and by ``mm eval``: zero-shot classification, image-text
retrieval and captioning, each configured in an :class:`EvalConfig`."""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..data.decode import SampleDecoder
from ..data.transforms import image_transform
from ..data.wds import Collate, ShardStream, check_urls, is_local, make_loader
from ..tokenizer import get_tokenizer
from ..utils.nn import eval_mode
from ..utils.precision import autocast_dtype
from .captioning import caption_eval
from .config import EvalConfig, ShardReading
from .retrieval import retrieval_eval
from .zeroshot import load_names, zero_shot_classifier, zero_shot_eval


def shard_info(urls: list[str]) -> dict[str, Any]:
    """The ``info.json`` beside local shards ({} if none): class names, zero-shot templates."""
    if not urls or not is_local(urls[0]):
        return {}
    path = Path(urls[0].removeprefix("file://")).parent / "info.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def eval_batches(model, urls: list[str], need: tuple[str, ...], *, batch_size: int,
                 reading: ShardReading = ShardReading(), label_key: str = "cls", max_samples: int | None = None,
                 on_meta: Callable[[dict[str, Any]], None] | None = None,
                 decoder_class: type[SampleDecoder] = SampleDecoder) -> Iterator[dict[str, Any]]:
    """Batches of decoded samples from ``urls`` in the model's eval preprocessing, in shard order;
    ``on_meta(meta)`` sees every batch's report (skipped samples by name and reason, warnings), including a
    final report that comes without samples. ``decoder_class``: a SampleDecoder whose samples carry more than the
    image (the image's stored size for referring, its class map for the dense probe)."""
    decoder = decoder_class(image_transform(model, train=False, seq_len=reading.seq_len), image_keys=reading.image_keys,
                            text_key=reading.text_key, label_key=label_key, need=need,
                            max_pixels=reading.max_pixels)
    stream = ShardStream(urls, decoder, Collate(), batch_size, train=False, max_samples=max_samples)
    for b in make_loader(stream, reading.workers, reading.prefetch_factor):
        if on_meta is not None:
            on_meta(b["meta"])
        if "images" in b:
            yield b


def evaluate(cfg: EvalConfig, model, device: torch.device, *, precision: str = "fp32",
             reading: ShardReading = ShardReading(), output_dir: str | Path | None = None) -> dict[str, Any]:
    """Zero-shot top-1/top-5, retrieval recall@1/5/10 and caption BLEU-4 / CIDEr (and the attributes captions
    get right, ``caption_attr_*``, on images whose json records them: the built-in set), for the shard sets
    configured in ``cfg``, encoding under ``precision``'s autocast. Captions are written to
    ``output_dir/captions.jsonl`` (when given); the first ``cfg.captioning.show`` are returned under
    ``caption_examples``."""
    tok = get_tokenizer(model)
    results: dict[str, Any] = {}
    dtype = autocast_dtype(precision)

    def batches(urls, need, **kw):
        return eval_batches(model, urls, need, batch_size=cfg.batch_size, reading=reading, **kw)

    with eval_mode(model):  # restores every module's mode (frozen towers stay in eval mode)
        zs = cfg.zeroshot
        if zs.shards:
            urls = check_urls(zs.shards, "eval.zeroshot.shards")
            info = shard_info(urls)
            classnames = load_names(zs.classnames if zs.classnames is not None else info.get("classes"),
                                    "classnames")
            templates = zs.templates if zs.templates is not None else info.get("templates")
            templates = load_names(templates, "templates") if templates is not None else None
            W = zero_shot_classifier(model, tok, classnames, templates, device=device)
            loader = batches(urls, ("label",), label_key=zs.label_key, max_samples=zs.max_samples)
            r = zero_shot_eval(model, W, ((b["images"], b["labels"]) for b in loader), device=device,
                               autocast_dtype=dtype)
            results.update(zeroshot_top1=r["zeroshot_top1"], zeroshot_top5=r["zeroshot_top5"], zeroshot_n=r["n"])
        rt = cfg.retrieval
        if rt.shards:
            urls = check_urls(rt.shards, "eval.retrieval.shards")
            loader = batches(urls, ("captions",), max_samples=rt.max_samples)
            r = retrieval_eval(model, tok, ((b["images"], b["captions"]) for b in loader), device=device,
                               autocast_dtype=dtype)
            results.update({k: v for k, v in r.items() if k.startswith(("i2t", "t2i"))})
        cp = cfg.captioning
        if cp.shards:
            urls = check_urls(cp.shards, "eval.captioning.shards")
            loader = batches(urls, ("captions", "info"), max_samples=cp.max_samples)
            r = caption_eval(model, tok, ((b["images"], b["captions"], b["keys"], b["infos"]) for b in loader),
                             cp.generation, device=device, autocast_dtype=dtype)
            rows = r.pop("captions")
            if output_dir is not None:
                with open(Path(output_dir) / "captions.jsonl", "w") as f:
                    f.writelines(json.dumps(row) + "\n" for row in rows)
            results.update(caption_bleu4=r["caption_bleu4"], caption_cider=r["caption_cider"], caption_n=r["caption_n"])
            results.update({k: v for k, v in r.items() if k.startswith("caption_attr_")})
            results["caption_examples"] = rows[: cp.show]
    return results
