"""Contrastive losses for CLIP-style models: CLIP (InfoNCE) and SigLIP (sigmoid).

Each loss is an ``nn.Module`` called on a model output (duck typed; anything
with ``image_emb``, ``text_emb``, ``logit_scale``, ``logit_bias`` and
``aux_loss`` attributes) and returns a dict of scalar tensors:

* ``loss``: the total to backpropagate, ``contrastive_loss + aux_weight * aux_loss``;
* ``contrastive_loss``;
* ``aux_loss``: only when ``out.aux_loss`` is not None (MoE load-balancing loss,
  already weighted per tower by the model).

``logit_scale`` is the multiplier itself (already exponentiated, as open_clip's
model forward returns it). The logits are computed in at least float32 (float64
inputs stay float64) so bf16 features do not lose precision in the softmax /
log-sigmoid. No ``.item()`` or other host synchronisation happens here.

Distributed convention (the DDP one)
------------------------------------
Under ``torch.distributed`` with W ranks, each holding B samples of a global
batch of N = W*B, every rank backpropagates its own loss and DDP then
*averages* parameter gradients over ranks. Let L be the single-process loss over
the whole global batch. With the default settings
(``gather_with_grad=True``; the all-gather's backward sums gradients over ranks):

* the gradient that rank r's local features receive equals ``W * dL/d(local
  features)``, so after DDP's 1/W average the parameter gradient equals the
  single-process one;
* ``ClipLoss(local_loss=False)``: every rank's loss value equals L, and every
  rank's ``logit_scale`` gradient equals ``dL/dscale``;
* ``ClipLoss(local_loss=True)`` and ``SigLipLoss``: the per-rank loss values
  and ``logit_scale`` / ``logit_bias`` gradients differ across ranks; their
  average over ranks equals L and ``dL/dscale`` (``dL/dbias``) respectively.

With ``ClipLoss(gather_with_grad=False)`` other ranks' features are constants:
for ``local_loss=False`` the local features get exactly ``dL/dx`` (1x, so after
DDP averaging parameter gradients are 1/W of the single-process ones, a
constant factor the learning rate absorbs); for ``local_loss=True`` they get
only ``dL_r/dx``, the part of the gradient from this rank's loss, which is not
proportional to the single-process gradient. Prefer the default.

All gathers require the same local batch size on every rank.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .utils import dist as mmdist

__all__ = ["ClipLoss", "SigLipLoss", "CocaLoss", "DistillLoss", "TokenCrossEntropy", "caption_loss", "make_loss",
           "LOSSES"]


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when any input is float64 (never lower than fp32)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _embeddings(out: Any) -> tuple[Tensor, Tensor]:
    img, txt = getattr(out, "image_emb", None), getattr(out, "text_emb", None)
    if img is None or txt is None:
        raise ValueError("contrastive losses need both out.image_emb and out.text_emb")
    return img, txt


def _as_tensor(x: Any, like: Tensor) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(x, device=like.device)


class _ContrastiveLoss(nn.Module):
    """Shared bits: aux-loss handling and the output dict."""

    def __init__(self, aux_weight: float = 1.0):
        super().__init__()
        self.aux_weight = aux_weight

    def contrastive(self, out: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, out: Any) -> dict[str, Tensor]:
        contrastive = self.contrastive(out)
        result = {"contrastive_loss": contrastive}
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            result["aux_loss"] = aux
            result["loss"] = contrastive + self.aux_weight * aux
        else:
            result["loss"] = contrastive
        return result


class ClipLoss(_ContrastiveLoss):
    """CLIP's symmetric InfoNCE loss.

    ``logits = logit_scale * img @ txt.T`` (plus ``logit_bias`` if the model has
    one); the loss is the mean of cross-entropy image->text and text->image,
    with the matching pair on the diagonal. A constant ``logit_bias`` shifts
    every logit of a softmax row equally, so it changes neither the value nor
    any gradient (its own gradient is 0); it is added only for parity with
    open_clip.

    Distributed (see the module docstring for the gradient convention):

    * ``local_loss=False`` (default): gather all features and compute the full
      N x N logits on every rank; the loss value on every rank is the
      single-process loss.
    * ``local_loss=True``: local images vs all texts and local texts vs all
      images (B x N logits, labels offset by ``rank * B``); less memory and
      compute, the average over ranks of the loss is the single-process loss.
    * ``gather_with_grad``: gather with a differentiable all-gather (default,
      exact gradients) or gather constants and keep only the local slice
      differentiable (cheaper backward; gradient caveats in the module doc).

    Labels tensors are cached per (device, size, offset) to avoid reallocating
    them every step.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = True, aux_weight: float = 1.0):
        super().__init__(aux_weight)
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self._labels: dict[tuple[torch.device, int, int], Tensor] = {}

    def labels(self, device: torch.device, n: int, offset: int = 0) -> Tensor:
        key = (device, n, offset)
        lab = self._labels.get(key)
        if lab is None:
            lab = torch.arange(offset, offset + n, device=device, dtype=torch.long)
            self._labels[key] = lab
        return lab

    def contrastive(self, out: Any) -> Tensor:
        img, txt = _embeddings(out)
        scale = _as_tensor(out.logit_scale, img)
        bias = getattr(out, "logit_bias", None)
        dtype = _compute_dtype(img, txt, scale)
        img, txt, scale = img.to(dtype), txt.to(dtype), scale.to(dtype)
        bias = None if bias is None else _as_tensor(bias, img).to(dtype)

        world = mmdist.world_size()
        if world > 1:
            gather = mmdist.all_gather_with_grad if self.gather_with_grad else mmdist.all_gather_no_grad
            all_img, all_txt = gather(img), gather(txt)
            if self.local_loss:
                logits_i = scale * img @ all_txt.T
                logits_t = scale * txt @ all_img.T
                labels = self.labels(img.device, img.shape[0], mmdist.rank() * img.shape[0])
            else:
                logits_i = scale * all_img @ all_txt.T
                logits_t = logits_i.T
                labels = self.labels(img.device, all_img.shape[0])
        else:
            logits_i = scale * img @ txt.T
            logits_t = logits_i.T
            labels = self.labels(img.device, img.shape[0])

        if bias is not None:
            logits_i = logits_i + bias
            logits_t = logits_t + bias
        return (F.cross_entropy(logits_i, labels) + F.cross_entropy(logits_t, labels)) / 2


class SigLipLoss(_ContrastiveLoss):
    """SigLIP's pairwise sigmoid loss.

    ``loss = -sum_ij logsigmoid(y_ij * (logit_scale * img_i . txt_j + logit_bias)) / B``
    with ``y = 2 * eye - 1`` over the global pairs and B the *local* batch size.

    Distributed: text features are all-gathered with grad and the local images
    are scored against all N texts (B x N logits, positives at column
    ``rank * B + i``). In value this equals open_clip's neighbour-exchange
    variants (which sum the local block plus the negative-only blocks for every
    other rank's texts, divided by B); it trades the W-1 ring exchanges for one
    all-gather. The per-rank loss is this rank's share: the average over ranks
    equals the single-process loss over the global batch (see the module
    docstring for the gradients).

    ``block``: compute the loss in (block x block) tiles of the B x N logits, forward and backward (a custom
    autograd function that recomputes each tile in the backward), so its memory is that of one tile whatever
    the world batch: the same value and gradients as the one-block loss (up to float summation order). None:
    the B x N logits at once (faster when they fit).
    """

    def __init__(self, aux_weight: float = 1.0, block: int | None = None):
        super().__init__(aux_weight)
        if block is not None and block < 1:
            raise ValueError(f"block must be >= 1 or None, got {block}")
        self.block = block
        self._labels: dict[tuple[torch.device, torch.dtype, int, int, int], Tensor] = {}

    def labels(self, device: torch.device, dtype: torch.dtype, b: int, n: int, offset: int = 0) -> Tensor:
        """(b, n) matrix: +1 at (i, offset + i), -1 elsewhere; cached."""
        key = (device, dtype, b, n, offset)
        lab = self._labels.get(key)
        if lab is None:
            lab = -torch.ones((b, n), device=device, dtype=dtype)
            idx = torch.arange(b, device=device)
            lab[idx, idx + offset] = 1.0
            self._labels[key] = lab
        return lab

    def contrastive(self, out: Any) -> Tensor:
        img, txt = _embeddings(out)
        scale = _as_tensor(out.logit_scale, img)
        bias = getattr(out, "logit_bias", None)
        dtype = _compute_dtype(img, txt, scale)
        img, txt, scale = img.to(dtype), txt.to(dtype), scale.to(dtype)

        b = img.shape[0]
        all_txt = mmdist.all_gather_with_grad(txt)
        if self.block is not None:
            bias_t = torch.zeros((), device=img.device, dtype=dtype) if bias is None else _as_tensor(bias, img).to(dtype)
            return _BlockedSigmoid.apply(img, all_txt, scale, bias_t, mmdist.rank() * b, self.block)
        logits = scale * img @ all_txt.T
        if bias is not None:
            logits = logits + _as_tensor(bias, img).to(dtype)
        labels = self.labels(img.device, dtype, b, all_txt.shape[0], mmdist.rank() * b)
        return -F.logsigmoid(labels * logits).sum() / b


class _BlockedSigmoid(torch.autograd.Function):
    """SigLIP's loss over (B, D) images and (N, D) texts, tile by tile: ``-sum logsigmoid(y * z) / B`` with
    ``z = scale * img @ txt.T + bias``, ``y`` +1 at (i, offset + i) and -1 elsewhere. Saves only the inputs; the
    backward recomputes each tile: ``dz = -y * sigmoid(-y * z) / B``, ``d img = scale * dz @ txt``,
    ``d txt = scale * dz.T @ img``, ``d scale = sum(dz * img @ txt.T)``, ``d bias = sum(dz)``."""

    @staticmethod
    def _tiles(b: int, n: int, block: int):
        for r in range(0, b, block):
            for c in range(0, n, block):
                yield slice(r, min(r + block, b)), slice(c, min(c + block, n))

    @staticmethod
    def _signs(rows: slice, cols: slice, offset: int, like: Tensor) -> Tensor:
        i = torch.arange(rows.start, rows.stop, device=like.device)[:, None] + offset
        j = torch.arange(cols.start, cols.stop, device=like.device)[None, :]
        return torch.where(i == j, 1.0, -1.0).to(like.dtype)

    @staticmethod
    def forward(ctx, img: Tensor, txt: Tensor, scale: Tensor, bias: Tensor, offset: int, block: int) -> Tensor:
        ctx.save_for_backward(img, txt, scale, bias)
        ctx.offset, ctx.block = offset, block
        total = img.new_zeros(())
        for rows, cols in _BlockedSigmoid._tiles(img.shape[0], txt.shape[0], block):
            z = scale * img[rows] @ txt[cols].T + bias
            total = total - F.logsigmoid(_BlockedSigmoid._signs(rows, cols, offset, z) * z).sum()
        return total / img.shape[0]

    @staticmethod
    def backward(ctx, grad: Tensor):
        img, txt, scale, bias = ctx.saved_tensors
        g_img, g_txt = torch.zeros_like(img), torch.zeros_like(txt)
        g_scale, g_bias = torch.zeros_like(scale), torch.zeros_like(bias)
        k = grad / img.shape[0]
        for rows, cols in _BlockedSigmoid._tiles(img.shape[0], txt.shape[0], ctx.block):
            raw = img[rows] @ txt[cols].T
            y = _BlockedSigmoid._signs(rows, cols, ctx.offset, raw)
            dz = -y * torch.sigmoid(-y * (scale * raw + bias)) * k
            g_img[rows] += scale * dz @ txt[cols]
            g_txt[cols] += scale * dz.T @ img[rows]
            g_scale += (dz * raw).sum()
            g_bias += dz.sum()
        return g_img, g_txt, g_scale, g_bias, None, None


def caption_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean token cross-entropy of (..., V) logits against (...) labels, -100 ignored, computed in fp32: the value
    and gradient of ``F.cross_entropy(logits.float(), labels, ignore_index=-100, label_smoothing=...)``, by
    :class:`TokenCrossEntropy` (a few passes over the logits instead of about six)."""
    return TokenCrossEntropy.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), float(label_smoothing))


class TokenCrossEntropy(torch.autograd.Function):
    """Cross-entropy over a large vocabulary with its gradient made in the forward pass, row block by row block.

    ``F.cross_entropy`` on (N, V) bf16 logits first copies them to fp32, saves the fp32 log-softmax for the
    backward, which then zero-fills an (N, V) tensor for the NLL gradient and runs the log-softmax backward: about
    six passes over N x V fp32 values. Here each block of rows is cast to fp32 once, its log-sum-exp and its
    gradient ``softmax - target`` (``target = (1 - eps) onehot + eps / V``) computed while the block is in cache,
    and the gradient kept in the logits' dtype; the backward only scales it by the incoming scalar. The logits
    themselves are not kept (the LM head's backward needs its inputs, not its output), so memory is one (N, V)
    tensor in the logits' dtype instead of two in fp32. CoCa's caption loss over CLIP's 49,408 tokens on 2 CPU
    cores (N = 1,314): 3.5x faster in bf16, 1.9x in fp32, forward + backward (benchmarks/bench_kernels.py).
    """

    # fp32 values per block of rows: on a CPU a cache-sized block (16 rows of CLIP's vocabulary: 3.2 MB); on a GPU
    # a large one (680 rows: 134 MB), since each block costs a few kernel launches and passes over memory are cheap
    BLOCK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 25}

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, smoothing: float) -> Tensor:  # noqa: D102
        n, v = logits.shape
        valid = labels != -100
        count = valid.sum().clamp(min=1)
        needs_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(logits) if needs_grad else None
        total = logits.new_zeros((), dtype=torch.float32)
        safe = labels.masked_fill(~valid, 0)[:, None]
        block = max(1, TokenCrossEntropy.BLOCK_ELEMENTS.get(logits.device.type, 1 << 25) // v)
        for start in range(0, n, block):
            rows = slice(start, start + block)
            logp = torch.log_softmax(logits[rows], dim=-1, dtype=torch.float32)  # (b, V), one pass
            loss = -(1 - smoothing) * logp.gather(1, safe[rows])[:, 0]
            if smoothing:
                loss = loss - smoothing * logp.mean(-1)
            keep = valid[rows]
            total = total + loss.masked_fill(~keep, 0).sum()
            if needs_grad:  # d(mean loss)/dx = (softmax - target distribution) / count, zero for ignored rows
                g = logp.exp_()  # the target is subtracted in fp32: p - 1 of a confident token must not round to 0
                g.scatter_add_(1, safe[rows], g.new_full((g.shape[0], 1), -(1 - smoothing)))
                if smoothing:
                    g.sub_(smoothing / v)
                torch.mul(g, (keep / count)[:, None], out=grad[rows])  # scaled and cast in one pass
        ctx.grad = grad  # not saved_tensors: the backward scales it in place, once
        return total / count

    @staticmethod
    def backward(ctx, grad_out: Tensor):  # noqa: D102
        grad, ctx.grad = ctx.grad, None
        if grad is None:
            raise RuntimeError("TokenCrossEntropy's gradient was already used: a second backward through the caption "
                               "loss (retain_graph=True) is not supported")
        return grad.mul_(grad_out.to(grad.dtype)), None, None


class CocaLoss(nn.Module):
    """CoCa: ``contrastive_weight * contrastive + caption_weight * caption CE (+ aux_weight * aux)``.

    The contrastive part is any loss of this module (CLIP by default, SigLIP works too); the caption
    part is the token cross-entropy over ``out.caption_logits`` / ``out.caption_labels`` (padding already
    left out by the model; -100 labels are ignored too) with optional label smoothing. The defaults (1 and 2) are open_clip's. Distributed: the
    caption loss is each rank's token mean, which DDP's gradient averaging turns into the mean over
    ranks (the global token mean when ranks hold as many caption tokens).
    """

    def __init__(self, contrastive: nn.Module | None = None, contrastive_weight: float = 1.0,
                 caption_weight: float = 2.0, label_smoothing: float = 0.0, aux_weight: float = 1.0,
                 caption_fraction: float = 1.0):
        super().__init__()
        if not 0.0 < caption_fraction <= 1.0:
            raise ValueError(f"caption_fraction must be in (0, 1], got {caption_fraction}")
        self.caption_fraction = caption_fraction
        self.contrastive_loss = contrastive if contrastive is not None else ClipLoss(aux_weight=aux_weight)
        self.contrastive_weight = contrastive_weight
        self.caption_weight = caption_weight
        self.label_smoothing = label_smoothing
        self.aux_weight = aux_weight

    def caption_rows(self, batch: int) -> int:
        """The model's ``caption_rows`` for a batch of ``batch`` rows: ceil(fraction * batch), at least 1."""
        return max(1, math.ceil(self.caption_fraction * batch))

    def forward(self, out: Any) -> dict[str, Tensor]:
        logits, labels = getattr(out, "caption_logits", None), getattr(out, "caption_labels", None)
        if logits is None or labels is None:
            raise ValueError("the CoCa loss needs out.caption_logits and out.caption_labels (a CoCa model "
                             "called with images and tokens)")
        result = {"contrastive_loss": self.contrastive_loss.contrastive(out),
                  "caption_loss": caption_loss(logits, labels, self.label_smoothing)}
        loss = self.contrastive_weight * result["contrastive_loss"] + self.caption_weight * result["caption_loss"]
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            result["aux_loss"] = aux
            loss = loss + self.aux_weight * aux
        result["loss"] = loss
        return result


def similarity_kl(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(teacher || student) of the in-batch similarity distributions, both directions: over the rows of the
    (B, B) image->text logits and over their columns (text->image), averaged; in fp32."""
    t, s = teacher_logits.float(), student_logits.float()
    kl = 0.0
    for dim in (1, 0):  # image -> text rows, text -> image columns
        kl = kl + F.kl_div(F.log_softmax(s, dim), F.log_softmax(t, dim), log_target=True, reduction="sum")
    return kl / (2 * t.shape[0])


class DistillLoss(nn.Module):
    """Knowledge distillation from a frozen teacher's embeddings (mm/train/distill.py feeds them):

    ``loss = task_weight * task(out) + kl_weight * KL + feature_weight * feature``

    * ``task``: the run's usual loss (CLIP / SigLIP, CoCa's caption loss, MoE aux loss included);
    * KL: :func:`similarity_kl` between the teacher's and the student's in-batch image-text similarity
      distributions. Logits are ``scale * cos``: with ``temperature`` None each model uses its own logit
      scale (the teacher's fixed, the student's learned, so the student also learns the teacher's
      sharpness); a number T sets ``1 / T`` for both. No T^2 factor: the logits are bounded cosines.
      Local batch only under DDP (the in-batch distribution of each process);
    * feature: the student's normalised embeddings, mapped by a learned bias-free ``proj`` when the widths
      differ (one map shared by both modalities: they live in one space), against the teacher's
      normalised embeddings: ``cosine`` (1 - cos) or ``mse`` (squared L2 distance, batch mean); the mean
      of the image and text terms.

    ``teacher`` is ``(image_emb, text_emb, logit_scale)`` with L2-normalised (B, D_t) embeddings; the
    result adds ``task_loss``, ``kl_loss`` and ``feature_loss`` to the task loss's own entries.
    """

    def __init__(self, task: nn.Module | None, student_dim: int, teacher_dim: int, *, task_weight: float = 1.0,
                 kl_weight: float = 1.0, feature_weight: float = 0.0, feature_loss: str = "cosine",
                 temperature: float | None = None):
        super().__init__()
        if feature_loss not in ("cosine", "mse"):
            raise ValueError(f"feature_loss must be cosine or mse, got {feature_loss!r}")
        self.task = task
        self.task_weight, self.kl_weight, self.feature_weight = task_weight, kl_weight, feature_weight
        self.feature_loss, self.temperature = feature_loss, temperature
        self.proj = None
        if feature_weight > 0 and student_dim != teacher_dim:
            self.proj = nn.Linear(student_dim, teacher_dim, bias=False)
            nn.init.normal_(self.proj.weight, std=student_dim**-0.5)

    def _feature(self, s: Tensor, t: Tensor) -> Tensor:
        s = self.proj(s.to(self.proj.weight.dtype)) if self.proj is not None else s
        s, t = s.float(), t.float()
        if self.feature_loss == "cosine":
            return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
        return (s - t).pow(2).sum(-1).mean()

    def teacher_terms(self, out: Any, teacher: tuple[Tensor, Tensor, Tensor | float]) -> dict[str, Tensor]:
        """``kl_loss`` and ``feature_loss`` (0 when its weight is) of the student's ``out`` against ``teacher``."""
        t_img, t_txt, t_scale = teacher
        img, txt = _embeddings(out)
        if self.temperature is not None:
            s_scale = t_scale = 1.0 / self.temperature
        else:
            s_scale = _as_tensor(out.logit_scale, img).float()
        kl = similarity_kl(t_scale * t_img.float() @ t_txt.float().T, s_scale * img.float() @ txt.float().T)
        feat = (self._feature(img, t_img) + self._feature(txt, t_txt)) / 2 if self.feature_weight > 0 \
            else kl.new_zeros(())
        return {"kl_loss": kl, "feature_loss": feat}

    def forward(self, out: Any, teacher: tuple[Tensor, Tensor, Tensor | float]) -> dict[str, Tensor]:
        result = dict(self.task(out))
        result["task_loss"] = result["loss"]
        result.update(self.teacher_terms(out, teacher))
        result["loss"] = self.task_weight * result["task_loss"] + self.kl_weight * result["kl_loss"] + \
            self.feature_weight * result["feature_loss"]
        return result


# Registry for make_loss.
LOSSES: dict[str, type[nn.Module]] = {
    "clip": ClipLoss,
    "siglip": SigLipLoss,
    "coca": CocaLoss,
}


def make_loss(kind: str, **kw: Any) -> nn.Module:
    """Build a loss by name: ``"clip"``, ``"siglip"`` or ``"coca"``; keyword args go to its constructor."""
    try:
        cls = LOSSES[kind]
    except KeyError:
        raise ValueError(f"unknown loss kind {kind!r}; valid kinds: {', '.join(sorted(LOSSES))}") from None
    return cls(**kw)
