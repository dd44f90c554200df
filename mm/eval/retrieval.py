"""Image <-> text retrieval recall@K over a captioned image set (Flickr / COCO style: several captions per image).

All images and all captions are embedded once; similarities are then computed one chunk of images at a
time, keeping only top-k indices, so 10k images x 50k captions never materialise a 10k x 50k matrix.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ..utils.nn import eval_mode, model_device
from ..utils.precision import autocast


def _caption_lists(captions: Sequence[Any], n_images: int, offset: int) -> list[list[str]]:
    if len(captions) != n_images:
        raise ValueError(f"batch has {n_images} images but {len(captions)} caption lists")
    out = []
    for i, caps in enumerate(captions):
        caps = [caps] if isinstance(caps, str) else list(caps)  # a bare string is one caption, not characters
        if not caps or not all(isinstance(c, str) for c in caps):
            raise ValueError(f"image {offset + i}: needs a list of >= 1 caption strings, got {caps!r}")
        out.append(caps)
    return out


def embed_pairs(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, Sequence[Sequence[str]]]],
    *,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    text_batch_size: int = 256,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(image_emb ``(N, D)``, text_emb ``(M, D)``, text_owner ``(M,)`` = image index of each caption), fp32."""
    images_out, texts_out, owners = [], [], []
    n_images = 0
    with eval_mode(model):
        for images, captions in batches:
            caps = _caption_lists(captions, images.shape[0], n_images)
            with autocast(device, autocast_dtype):
                images_out.append(model.encode_image(images.to(device), normalize=True).float())
            flat = [c for cs in caps for c in cs]
            owners += [n_images + i for i, cs in enumerate(caps) for _ in cs]
            for j in range(0, len(flat), text_batch_size):
                tokens = tokenizer(flat[j:j + text_batch_size]).to(device)
                with autocast(device, autocast_dtype):
                    texts_out.append(model.encode_text(tokens, normalize=True).float())
            n_images += images.shape[0]
    if n_images == 0:
        raise ValueError("retrieval_eval: no images in batches")
    return torch.cat(images_out), torch.cat(texts_out), torch.tensor(owners, device=device)


def recall_at_k(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_owner: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Recall@k both ways from unit embeddings; ``text_owner[m]`` is the image that caption ``m`` describes.

    Image -> text: an image is a hit if ANY of its captions is among its top-k texts. Text -> image: a
    caption is a hit if its image is among its top-k images. Ties are broken by ``topk``, as a dense
    evaluation would. Peak extra memory is ``chunk_size x n_texts`` similarities plus ``n_texts x max(ks)``
    running top-k entries.
    """
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {tuple(ks)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    n_img, n_txt = image_emb.shape[0], text_emb.shape[0]
    device = image_emb.device
    k_i2t, k_t2i = min(max(ks), n_txt), min(max(ks), n_img)
    i2t_hits = []  # per chunk: (c, k_i2t) bool, "a caption of this image sits at rank r"
    t2i_val = torch.empty(n_txt, 0, device=device)  # running best images per caption
    t2i_idx = torch.empty(n_txt, 0, dtype=torch.long, device=device)
    for s in range(0, n_img, chunk_size):
        sim = image_emb[s:s + chunk_size] @ text_emb.T  # (c, M)
        own = torch.arange(s, s + sim.shape[0], device=device)[:, None]
        i2t_hits.append(text_owner[sim.topk(k_i2t, dim=1).indices] == own)
        # Merge this chunk's candidates into the running top-k: the global top-k of every caption is
        # inside (previous top-k) U (this chunk's top-k), so nothing outside it is ever needed.
        top = sim.T.topk(min(k_t2i, sim.shape[0]), dim=1)
        vals, idx = torch.cat([t2i_val, top.values], 1), torch.cat([t2i_idx, top.indices + s], 1)
        best = vals.topk(min(k_t2i, vals.shape[1]), dim=1)
        t2i_val, t2i_idx = best.values, idx.gather(1, best.indices)
    i2t = torch.cat(i2t_hits)  # (N, k_i2t)
    t2i = t2i_idx == text_owner[:, None]  # (M, k_t2i)
    # hit within the first k ranks; all counts synced in one transfer
    names = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ks]
    counts = [hits[:, :k].any(dim=1).sum() for hits in (i2t, t2i) for k in ks]
    totals = [n_img] * len(ks) + [n_txt] * len(ks)
    return {name: c / n for name, c, n in zip(names, torch.stack(counts).tolist(), totals)}


def retrieval_eval(
    model: Any,
    tokenizer: Callable[[list[str]], torch.Tensor],
    batches: Iterable[tuple[torch.Tensor, Sequence[Sequence[str]]]],
    *,
    ks: Sequence[int] = (1, 5, 10),
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
    chunk_size: int = 1024,
    text_batch_size: int = 256,
) -> dict[str, float | int]:
    """Recall@k of ``model`` on ``(images [B,3,H,W], captions)`` batches, ``captions[i]`` = the list of
    captions (>= 1) of image ``i`` (a bare string counts as one caption).

    Returns ``i2t_r{k}`` and ``t2i_r{k}`` for each k (fractions in [0, 1]), ``n_images`` and ``n_texts``.
    ``chunk_size`` images are scored against all captions at a time; ``text_batch_size`` captions are
    encoded per forward.
    """
    device = torch.device(device) if device is not None else model_device(model)
    img, txt, owner = embed_pairs(model, tokenizer, batches, device=device, autocast_dtype=autocast_dtype,
                                  text_batch_size=text_batch_size)
    out: dict[str, float | int] = dict(recall_at_k(img, txt, owner, ks, chunk_size=chunk_size))
    out["n_images"], out["n_texts"] = img.shape[0], txt.shape[0]
    return out
