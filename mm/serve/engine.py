"""The model calls ``mm serve`` makes, as plain synchronous functions over lists (one list = one batch): what
the batcher runs in its model thread. Each is the library's own computation on the same inputs, so a served
answer equals the library's:

* image / text embeddings: ``encode_image`` / ``encode_text(tokenizer(texts))`` with ``normalize=True``, as
  ``mm embed`` and ``mm search`` make them (fp32 rows);
* zero-shot: :func:`mm.zero_shot_classifier` (cached per class list and templates) and :func:`mm.eval.zeroshot.predict`'s
  probabilities (softmax over ``100 * cos``);
* captions: :func:`mm.inference.generate.generate`, as ``mm caption`` / :func:`mm.caption` run it;
* referring (LocCa models): :func:`mm.inference.ground.locate` on the preprocessed images with their original sizes,
  as ``mm ground`` runs it on the files.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import astuple, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..data.transforms import image_transform, stack_images
from ..eval.zeroshot import zero_shot_classifier
from ..inference.generate import GenerationConfig, generate
from ..inference.ground import GroundingError, box_tokens, locate
from ..inference.retrieval import caption_with_datastore
from ..tokenizer import get_tokenizer
from ..utils.nn import model_device
from ..utils.precision import autocast

CLASSIFIER_CACHE = 64  # zero-shot classifiers kept (class list x templates)
DEFAULT_PROMPTS = 80  # zero_shot_classifier's default templates: OpenAI's 80 ImageNet prompts


@dataclass(frozen=True)
class CaptionJob:
    """One image to caption with ``config``; ``seed`` for sampling (each sampled caption runs alone with its own
    generator, as ``mm caption --seed`` does for one image, so it does not depend on what it was batched with)."""

    image: torch.Tensor
    config: GenerationConfig
    seed: int | None = None
    k: int = 0  # retrieved captions the decoder reads first (a served datastore)
    retrieval_image: torch.Tensor | None = None  # the image as the datastore's model reads it (if not the model)

    def key(self) -> tuple:
        cfg = astuple(self.config)
        return (cfg, self.k, self.seed, id(self)) if self.config.method == "sample" else (cfg, self.k)


@dataclass(frozen=True)
class GroundJob:
    """One expression to ground in a preprocessed image whose original size is ``size`` (width, height)."""

    image: torch.Tensor
    text: str
    size: tuple[int, int]


def _ground_problem(model: Any) -> str | None:
    try:
        box_tokens(model)
    except GroundingError as e:
        return str(e)
    return None


class Engine:
    def __init__(self, model: Any, *, precision: str = "fp32", seq_len: int | None = None, datastore: Any = None,
                 retrieval_model: Any = None, k: int = 4):
        """``datastore`` (a :class:`mm.inference.retrieval.Datastore`) with ``retrieval_model`` (its model; default:
        ``model``) and ``k``: captions read the captions it retrieves first (retrieval-augmented captioning)."""
        self.model = model.eval()
        self.datastore, self.k = datastore, k
        self.retrieval_model = (retrieval_model if retrieval_model is not None else model).eval()
        self.retrieval_transform = None if self.retrieval_model is model else \
            image_transform(self.retrieval_model, train=False)
        self.device = model_device(model)
        self.precision = precision
        self.tokenizer = get_tokenizer(model)
        # embeddings, zero-shot and search read images as NaFlex patches with a seq_len; captioning and grounding
        # read square images (their decoders and boxes work on the square input)
        self.square = image_transform(model, train=False)
        self.transform = self.square if seq_len is None else image_transform(model, train=False, seq_len=seq_len)
        self.can_caption = getattr(getattr(model, "config", None), "decoder", None) is not None \
            and hasattr(model, "next_token_logits")
        self.no_ground = _ground_problem(model)  # why the model cannot ground text (None: it can)
        self.can_ground = self.no_ground is None
        self._classifiers: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.dim = int(self.embed_texts(["warm up"])[0].shape[0])  # the first call pays one-off costs
        self.embed_images([self.preprocess(Image.new("RGB", (8, 8)))])

    # -- on any thread ---------------------------------------------------------------------------------
    def preprocess(self, image: Image.Image, square: bool = False) -> Any:
        """An image as the model reads it: for embeddings (NaFlex patches with ``seq_len``), or ``square`` for the
        decoder (captions, grounding)."""
        return (self.square if square else self.transform)(image)

    @staticmethod
    def top_classes(embedding: np.ndarray, classifier: torch.Tensor, k: int) -> list[tuple[int, float]]:
        """[(class index, probability)] of the ``k`` most probable classes, as :func:`mm.eval.zeroshot.predict`."""
        logits = 100.0 * torch.from_numpy(embedding)[None].float() @ classifier
        top = logits.softmax(dim=-1).topk(min(k, classifier.shape[1]), dim=-1)
        return list(zip(top.indices[0].tolist(), top.values[0].tolist()))

    # -- in the model thread (the batcher's run functions) -------------------------------------------------
    @torch.inference_mode()
    def embed_images(self, images: Sequence[torch.Tensor]) -> list[np.ndarray]:
        x = stack_images(list(images)).to(self.device)
        with autocast(self.device, self.precision):
            emb = self.model.encode_image(x, normalize=True)
        return list(emb.float().cpu().numpy())

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> list[np.ndarray]:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with autocast(self.device, self.precision):
            emb = self.model.encode_text(tokens, normalize=True)
        return list(emb.float().cpu().numpy())

    def classifiers(self, jobs: Sequence[tuple[tuple[str, ...], tuple[str, ...] | None]]) -> list[Any]:
        """Zero-shot classifiers ([embed_dim, n_classes], fp32 on the CPU) of (classes, templates or None for the
        library's default prompts); a ValueError (bad class names / templates) fails its own job only."""
        out: list[Any] = []
        for job in jobs:
            if job in self._classifiers:
                self._classifiers.move_to_end(job)
                out.append(self._classifiers[job])
                continue
            try:
                with torch.inference_mode():
                    W = zero_shot_classifier(self.model, self.tokenizer, list(job[0]),
                                             None if job[1] is None else list(job[1]))
            except ValueError as e:
                out.append(e)
                continue
            self._classifiers[job] = W = W.float().cpu()
            if len(self._classifiers) > CLASSIFIER_CACHE:
                self._classifiers.popitem(last=False)
            out.append(W)
        return out

    def preprocess_retrieval(self, image: Image.Image) -> torch.Tensor | None:
        """The image as the datastore's model reads it, when that is not the served model (None otherwise)."""
        return self.retrieval_transform(image) if self.retrieval_transform is not None else None

    def captions(self, jobs: Sequence[CaptionJob]) -> list[tuple[str, list[str]]]:
        """(caption, retrieved captions) of jobs that share one generation config and k (the batcher groups them by
        :meth:`CaptionJob.key`)."""
        images = torch.stack([j.image for j in jobs]).to(self.device)
        seed = jobs[0].seed
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        if jobs[0].k:
            retrieval = torch.stack([j.retrieval_image for j in jobs]) if jobs[0].retrieval_image is not None \
                else None
            with torch.inference_mode():
                caps, found = caption_with_datastore(self.model, self.tokenizer, images, self.datastore,
                                                     self.retrieval_model, jobs[0].k, config=jobs[0].config,
                                                     batch_size=len(jobs), retrieval_images=retrieval,
                                                     generator=generator)
            return list(zip(caps, found))
        ids = generate(self.model, images, jobs[0].config, generator=generator)
        eot = self.model.config.text.eot_id
        return [(self.tokenizer.decode(row[: row.index(eot)] if eot in row else row), []) for row in ids.tolist()]

    @torch.inference_mode()
    def ground(self, jobs: Sequence[GroundJob]) -> list[dict[str, Any]]:
        """``{"text", "box" (pixels of the original image), "score"}`` per job (any expressions, any images)."""
        images = torch.stack([j.image for j in jobs]).to(self.device)
        found = locate(self.model, self.tokenizer, images, [j.text for j in jobs], batch_size=len(jobs),
                       device=self.device, sizes=[j.size for j in jobs])
        return [{"text": j.text, "box": list(r.box), "score": r.score} for j, r in zip(jobs, found)]
