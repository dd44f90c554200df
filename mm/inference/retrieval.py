"""Retrieval augmentation: a datastore of captions, what it returns for images, and captions written with it.

A **datastore** is an ``mm embed --texts`` output (or an ``mm index build`` over one): captions embedded by a
model. Built from webdataset shards, its ids are ``KEY#I: caption`` (:func:`mm.inference.embed.shard_captions`),
so every caption knows the sample it came from; built from a text file, ``LINE: text``. Swapping the datastore
moves a model to another domain without training (SmallCap).

- :func:`retrieve`: the ``k`` best captions of each query embedding (cosine, the datastore's ranking: exact, or the
  approximate index's), leaving out those of the query's own sample (``exclude``: a training image must not read
  its own captions). Deterministic: the same inputs give the same captions.
- :func:`write_retrieved`: what each image of an ``mm embed`` output retrieves, as JSON lines
  ``{"key", "captions"}`` (``mm retrieve``): a training run reads it by sample key (``data.retrieval``).
- :func:`caption_with_datastore`: captions whose decoder first reads the image's retrieved captions
  (:class:`mm.data.retrieved.RetrievalPrompts`); ``k = 0`` is plain captioning.

Queries are embedded by the datastore's own model (its weights fingerprint is checked), which need not be the
captioning model: a retrieval model and a small captioner, as in SmallCap.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.retrieved import RetrievalPrompts
from ..utils.io import atomic_path
from .ann import is_ann, read_ann
from .ann import search as ann_search
from .embed import EmbedError, read_index
from .generate import GenerationConfig, _load_images, generate
from .search import search


class Datastore:
    """A caption datastore (module docstring) in ``directory``."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.ann = read_ann(self.dir) if is_ann(self.dir) else None
        self.info = self.ann["embed"] if self.ann else read_index(self.dir)
        if self.info.get("kind") != "texts":
            raise EmbedError(f"{self.dir}: a datastore holds captions (an `mm embed` output of texts); this one holds "
                             f"{self.info.get('kind', 'images')}")
        self.count = self.ann["count"] if self.ann else self.info["count"]

    @property
    def model(self) -> str | None:
        return self.info.get("model")

    def search(self, queries: np.ndarray, n: int) -> tuple[np.ndarray, list[list[str]]]:
        return ann_search(self.dir, queries, n) if self.ann else search(self.dir, queries, n)


def split_id(id_: str) -> tuple[str | None, str]:
    """(the sample key a datastore id came from, or None for a text file's line; the caption)."""
    head, sep, text = id_.partition(": ")
    if not sep:
        return None, id_
    key, hash_, pos = head.rpartition("#")
    return (key, text) if hash_ and pos.isdigit() else (None, text)


def retrieve(store: Datastore, queries: np.ndarray, k: int,
             exclude: Sequence[str | None] | None = None) -> list[list[str]]:
    """The ``k`` best captions of each query ([Q, d] unit embeddings of the datastore's model), best first; those
    whose sample key is the query's ``exclude`` entry are left out (and more are fetched in their place)."""
    if k <= 0:
        return [[] for _ in range(len(queries))]
    out: list[list[str] | None] = [None] * len(queries)
    todo, n = list(range(len(queries))), k + 8
    while todo:
        _, ids = store.search(queries[todo], min(n, store.count))
        left = []
        for q, found in zip(todo, ids):
            own = exclude[q] if exclude is not None else None
            caps = [text for key, text in map(split_id, found) if own is None or key != own][:k]
            if len(caps) == k or n >= store.count:
                out[q] = caps
            else:
                left.append(q)
        todo, n = left, n * 4
    return [c for c in out if c is not None]


def _check_same_model(store: Datastore, info: dict[str, Any], where: str, allow_other: bool) -> None:
    a, b = store.info.get("model_fingerprint"), info.get("model_fingerprint")
    if info["embed_dim"] != store.info["embed_dim"] or (not allow_other and a and b and a != b):
        raise EmbedError(f"{where}: embedded by {info.get('model')}, the datastore {store.dir} by {store.model}: "
                         "queries and captions must come from the same model")


def write_retrieved(datastore: str | Path, queries_dir: str | Path, out: str | Path, k: int, *,
                    exclude_self: bool = True, batch: int = 1024, allow_other_model: bool = False) -> int:
    """For every image of the ``mm embed`` output ``queries_dir`` (ids: sample keys, as embedding shards gives),
    its ``k`` retrieved captions, written as JSON lines ``{"key", "captions"}`` to ``out`` (atomically); with
    ``exclude_self``, never the captions of the image's own sample. Returns the number of lines."""
    store = Datastore(datastore)
    qdir = Path(queries_dir)
    info = read_index(qdir)
    if info.get("kind") == "texts":
        raise EmbedError(f"{qdir}: queries must be image embeddings (an `mm embed` output of images)")
    _check_same_model(store, info, str(qdir), allow_other_model)
    lines = 0
    with atomic_path(Path(out)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for part in info["parts"]:
            emb = np.load(qdir / part["file"], mmap_mode="r")
            ids = json.loads((qdir / part["ids"]).read_text())["ids"]
            for b in range(0, len(ids), batch):
                keys = ids[b:b + batch]
                caps = retrieve(store, np.asarray(emb[b:b + batch], np.float32), k, keys if exclude_self else None)
                for key, c in zip(keys, caps):
                    f.write(json.dumps({"key": key, "captions": c}) + "\n")
                lines += len(keys)
    return lines


@torch.no_grad()
def caption_with_datastore(model: Any, tok: Any, images: torch.Tensor | Sequence[Any], store: Datastore,
                           retrieval_model: Any, k: int = 4, *, config: GenerationConfig | None = None,
                           batch_size: int = 32, device: torch.device | str | None = None,
                           retrieval_images: torch.Tensor | None = None,
                           **kwargs: Any) -> tuple[list[str], list[list[str]]]:
    """(captions, the captions each image retrieved): ``model``'s decoder continues ``sot`` + the ``k`` captions
    ``store`` returns for the image under ``retrieval_model`` (the datastore's model; it may be ``model``), in the
    SmallCap template (:class:`~mm.data.retrieved.RetrievalPrompts`). ``k = 0``: plain captioning. Generation
    settings as :func:`~mm.inference.generate.generate`'s (``config`` and / or its fields). ``images`` as a tensor:
    preprocessed for ``model``; ``retrieval_images``: the same images preprocessed for ``retrieval_model`` (default:
    ``images``)."""
    from ..data.transforms import image_transform

    device = device or next(model.parameters()).device
    prompts = RetrievalPrompts(tok, model.config.text.context_length, k)
    eot = model.config.text.eot_id
    own = None if isinstance(images, torch.Tensor) else image_transform(model, train=False)
    theirs = None if isinstance(images, torch.Tensor) or retrieval_model is model else \
        image_transform(retrieval_model, train=False)
    captions: list[str] = []
    found: list[list[str]] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        x = _load_images(chunk, own, device)
        if k:
            rdev = next(retrieval_model.parameters()).device
            xr = retrieval_images[start:start + batch_size].to(rdev) if retrieval_images is not None else \
                x if theirs is None else _load_images(chunk, theirs, rdev)
            q = retrieval_model.encode_image(xr, normalize=True).float().cpu().numpy()
            caps = retrieve(store, q, k)
        else:
            caps = [[] for _ in range(len(x))]
        rows = [prompts.prompt(c) for c in caps]
        out: list[str] = [""] * len(rows)
        for length in sorted({len(r) for r in rows}):  # prompts of one length generate together
            idx = [i for i, r in enumerate(rows) if len(r) == length]
            prompt = torch.tensor([rows[i] for i in idx], dtype=torch.long, device=device)
            ids = generate(model, x[idx], config, prompt=prompt, **kwargs)
            for i, row in zip(idx, ids[:, length:].tolist()):
                out[i] = tok.decode(row[: row.index(eot)] if eot in row else row)
        captions += out
        found += caps
    return captions, found
