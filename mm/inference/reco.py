"""Retrieval-augmented zero-shot (RECO, Iscen et al. ICLR 2024): a datastore of image-text pairs and a small trained
fusion (:mod:`mm.models.reco`) refine a model's embeddings, for zero-shot classification and retrieval, with the
model itself unchanged.

A RECO directory (``mm reco``)::

    images-N/        an ``mm embed`` output of source N's images (ids: sample keys)
    texts-N/         an ``mm embed`` output of their captions (ids ``KEY#I: caption``, from the same shards)
    fusion.safetensors, reco.json   the trained fusion, its config, the model, the training record

Pairs join each caption with its sample's image, within each source (shard sets whose keys may repeat across
sources, as two data sets numbered from 000000 do). The fusion is trained contrastively on the pairs themselves,
every pair's neighbours found with its own sample left out (a pair must not read its own caption or image), with a
seeded sampler: the same inputs and seed give the same weights. :class:`RecoModel` wraps the model so that
``encode_image`` / ``encode_text`` return fused embeddings: anything written against a model (``mm zeroshot``,
:func:`mm.eval.zeroshot.zero_shot_classifier`) uses it unchanged.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..models.reco import RecoConfig, RecoFusion
from ..utils.io import write_json_atomic
from .embed import EmbedError, embed_images, embed_texts, load_index, model_fingerprint, read_index
from .retrieval import split_id

RECO_NAME, FUSION_FILE = "reco.json", "fusion.safetensors"


def _pairs(images_dir: Path, texts_dir: Path) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, Any]]:
    """(image embeddings, text embeddings, sample keys) of one source's pairs, and its images' index."""
    ii, ti = read_index(images_dir), read_index(texts_dir)
    if ii.get("kind") == "texts" or ti.get("kind") != "texts":
        raise EmbedError(f"{images_dir} must hold images and {texts_dir} texts (`mm embed` outputs)")
    a, b = ii.get("model_fingerprint"), ti.get("model_fingerprint")
    if ii["embed_dim"] != ti["embed_dim"] or (a and b and a != b):
        raise EmbedError(f"{images_dir} and {texts_dir} were embedded by different models")
    img, img_ids = load_index(images_dir)
    txt, txt_ids = load_index(texts_dir)
    row_of = {k: i for i, k in enumerate(img_ids)}
    if len(row_of) < len(img_ids):
        dup = next(k for i, k in enumerate(img_ids) if row_of[k] != i)
        raise EmbedError(f"{images_dir}: sample key {dup!r} appears twice; pairs would be ambiguous (give shard "
                         "sets whose keys repeat as separate sources)")
    pairs = [(row_of[key], j, key) for j, (key, _) in enumerate(map(split_id, txt_ids)) if key in row_of]
    if not pairs:
        raise EmbedError(f"no caption of {texts_dir} belongs to an image of {images_dir} (ids KEY#I: caption "
                         "from embedding the same shards' texts)")
    rows, cols, keys = zip(*pairs)
    return np.asarray(img[list(rows)], np.float32), np.asarray(txt[list(cols)], np.float32), list(keys), ii


class PairStore:
    """Image-text pairs from ``mm embed`` outputs of images and of their captions, one pair of outputs per source
    (the same model): row i is a caption and its sample's image (unit float32 embeddings), ``keys[i]`` its
    sample ("N/KEY": source N's sample KEY)."""

    def __init__(self, images_dirs: str | Path | list[str | Path], texts_dirs: str | Path | list[str | Path]):
        images_dirs = images_dirs if isinstance(images_dirs, list) else [images_dirs]
        texts_dirs = texts_dirs if isinstance(texts_dirs, list) else [texts_dirs]
        parts = [_pairs(Path(i), Path(t)) for i, t in zip(images_dirs, texts_dirs)]
        fps = {p[3].get("model_fingerprint") for p in parts} - {None}
        if len({p[0].shape[1] for p in parts}) > 1 or len(fps) > 1:
            raise EmbedError(f"the sources {', '.join(map(str, images_dirs))} were embedded by different models")
        self.images = F.normalize(torch.from_numpy(np.concatenate([p[0] for p in parts])), dim=-1)
        self.texts = F.normalize(torch.from_numpy(np.concatenate([p[1] for p in parts])), dim=-1)
        self.keys = [f"{n}/{k}" for n, p in enumerate(parts) for k in p[2]]
        ii = parts[0][3]
        _, self.key_ids = np.unique(np.array(self.keys), return_inverse=True)
        self.key_ids = torch.from_numpy(self.key_ids.astype(np.int64))
        self.max_per_key = int(torch.bincount(self.key_ids).max())
        self.info = ii
        self.sources = len(parts)

    def __len__(self) -> int:
        return len(self.keys)

    def nearest(self, queries: torch.Tensor, side: str, k: int, exclude: torch.Tensor | None = None,
                block: int = 512) -> torch.Tensor:
        """Rows (Q, k) of the k pairs whose ``side`` ("image" / "text") embedding is nearest each query's (cosine,
        ties to the earlier row), leaving out pairs whose key id is the query's ``exclude`` entry."""
        bank = self.images if side == "image" else self.texts
        extra = self.max_per_key if exclude is not None else 0
        n = min(k + extra, len(bank))
        wide = min(n + self.max_per_key, len(bank))  # pairs of one image tie: take them whole before cutting
        out = []
        for s in range(0, len(queries), block):
            scores = queries[s:s + block].float() @ bank.T
            top, idx = torch.topk(scores, wide, dim=1)
            # ties to the earlier row (topk's order among equal scores is unspecified): sort by row, then by score
            by_row = torch.argsort(idx, dim=1)
            top, idx = top.gather(1, by_row), idx.gather(1, by_row)
            idx = idx.gather(1, torch.sort(top, dim=1, descending=True, stable=True).indices)[:, :n]
            if exclude is not None:
                own = self.key_ids[idx] == exclude[s:s + block, None]
                idx = torch.stack([row[~o][:k] for row, o in zip(idx, own)])
            out.append(idx[:, :k])
        return torch.cat(out)


class RecoModel(nn.Module):
    """A model whose ``encode_image`` / ``encode_text`` are fused with a pair datastore (RECO)."""

    def __init__(self, model: nn.Module, fusion: RecoFusion, store: PairStore):
        super().__init__()
        self.model, self.fusion, self.store = model, fusion, store

    @property
    def config(self) -> Any:
        return self.model.config

    def encode_image(self, images: Any, normalize: bool = True) -> torch.Tensor:
        e = F.normalize(self.model.encode_image(images, normalize=True).float(), dim=-1)
        nb = self.store.texts[self.store.nearest(e.cpu(), "image", self.fusion.cfg.k)].to(e.device)
        return self.fusion.image(e, nb)

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        e = F.normalize(self.model.encode_text(tokens, normalize=True).float(), dim=-1)
        nb = self.store.images[self.store.nearest(e.cpu(), "text", self.fusion.cfg.k)].to(e.device)
        return self.fusion.text(e, nb)


def train_fusion(store: PairStore, cfg: RecoConfig, *, steps: int = 1000, batch_size: int = 256, lr: float = 1e-3,
                 weight_decay: float = 0.01, seed: int = 0, log_every: int = 100) -> tuple[RecoFusion, list[dict]]:
    """The fusion trained on the store's pairs (CLIP's loss between fused image and fused text embeddings, a learned
    temperature, AdamW with cosine decay): each pair's neighbours leave its own sample out. Returns the fusion and
    the loss record every ``log_every`` steps."""
    torch.manual_seed(seed)
    fusion = RecoFusion(cfg)
    scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    nb_img = store.nearest(store.images, "image", cfg.k, exclude=store.key_ids)  # an image's neighbours' texts
    nb_txt = store.nearest(store.texts, "text", cfg.k, exclude=store.key_ids)  # a text's neighbours' images
    opt = torch.optim.AdamW([*fusion.parameters(), scale], lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s / steps, 1))))
    gen = torch.Generator().manual_seed(seed)
    log, t0 = [], time.perf_counter()
    fusion.train()
    for step in range(1, steps + 1):
        b = torch.randperm(len(store), generator=gen)[:batch_size]
        fi = fusion.image(store.images[b], store.texts[nb_img[b]])
        ft = fusion.text(store.texts[b], store.images[nb_txt[b]])
        logits = scale.exp().clamp(max=100) * fi @ ft.T
        same = store.key_ids[b][:, None] == store.key_ids[b][None]  # captions of one image: not negatives
        logits = logits.masked_fill(same & ~torch.eye(len(b), dtype=torch.bool), float("-inf"))
        labels = torch.arange(len(b))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            log.append({"step": step, "loss": round(float(loss.detach()), 5), "seconds": round(time.perf_counter() - t0, 1)})
    fusion.eval()
    return fusion, log


def _dirs(out: Path, sources: int) -> tuple[list[Path], list[Path]]:
    return [out / f"images-{n}" for n in range(sources)], [out / f"texts-{n}" for n in range(sources)]


def build(model: nn.Module, shards: str | list[str], out_dir: str | Path, *, model_spec: str | None = None,
          k: int = 8, steps: int = 1000, batch_size: int = 256, lr: float = 1e-3, seed: int = 0, workers: int = 0,
          depth: int = 1, heads: int = 8) -> dict[str, Any]:
    """Embed the pairs of each shard set of ``shards`` (a source: images and every caption; resumable, as
    ``mm embed``) into ``out_dir`` with ``model``, train the fusion and write it with reco.json. Returns reco.json's
    contents."""
    out, sources = Path(out_dir), [shards] if isinstance(shards, str) else list(shards)
    images, texts = _dirs(out, len(sources))
    for spec, i, t in zip(sources, images, texts):
        embed_images(model, [spec], i, model_spec=model_spec, workers=workers)
        embed_texts(model, spec, t, model_spec=model_spec, workers=workers)
    store = PairStore(images, texts)
    cfg = RecoConfig(dim=model.config.embed_dim, k=k, depth=depth, heads=heads)
    fusion, log = train_fusion(store, cfg, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    from safetensors.torch import save_file

    save_file(fusion.state_dict(), str(out / FUSION_FILE))
    info = {"format": "mm-reco", "version": 1, "config": asdict(cfg), "pairs": len(store), "sources": sources,
            "model": store.info.get("model"), "model_fingerprint": model_fingerprint(model),
            "training": {"steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed, "log": log}}
    write_json_atomic(out / RECO_NAME, info)
    return info


def load(directory: str | Path, model: nn.Module, allow_other_model: bool = False) -> RecoModel:
    """``model`` wrapped with the RECO datastore and fusion in ``directory``; EmbedError when it is not the model
    the datastore was made with (weights fingerprint), unless ``allow_other_model``."""
    d = Path(directory)
    path = d / RECO_NAME
    if not path.is_file():
        raise EmbedError(f"{path}: missing; not a RECO datastore (build one with `mm reco`)")
    info = json.loads(path.read_text())
    if not allow_other_model and info.get("model_fingerprint") not in (None, model_fingerprint(model)):
        raise EmbedError(f"{d}: made with the model {info.get('model')}, not this one: its pairs' embeddings are "
                         "another model's")
    from safetensors.torch import load_file

    fusion = RecoFusion(RecoConfig(**info["config"]))
    fusion.load_state_dict(load_file(str(d / FUSION_FILE)))
    device = next(model.parameters()).device
    return RecoModel(model, fusion.to(device).eval(), PairStore(*_dirs(d, len(info["sources"]))))
