"""Gradient caching (Gao et al. 2021, "Scaling deep contrastive learning batch size under memory limited setup"):
a contrastive batch larger than its activations fit, with exactly the full batch's loss and gradients.

A contrastive loss couples every sample to every other, so splitting the batch into micro-batches (gradient
accumulation) changes the loss: each part only sees its own negatives. Gradient caching splits the *network*
work instead (``train.grad_cache_chunk``, per process):

1. embed the batch chunk by chunk without autograd graphs (activations of one chunk at a time), keeping each
   chunk's random state (dropout, patch dropout);
2. compute the contrastive loss of the whole batch (across processes as usual: the losses gather the features)
   on those embeddings as leaves, and back-propagate it to them: the gradient of the loss with respect to every
   embedding (and to the logit scale / bias);
3. run each chunk again with its graph, its random state replayed so the network is the one of step 1, and
   back-propagate ``<embedding, cached gradient>`` through it; the chain rule makes the sum over chunks the full
   batch's parameter gradient.

The objective is a task (:mod:`mm.train.tasks`): step 2 computes its batch terms (``batch_terms``: contrastive,
distillation's KL and feature loss) once for the whole batch, and step 3 its local terms (``local_terms``: CoCa's
caption cross-entropy, MoE's aux loss) per chunk, each weighted by the chunk's share of the batch's units
(``local_units``: caption tokens, samples), so that a token mean over the batch is the sum of the chunks' shares.
An MoE aux loss so becomes the mean of the chunks' aux losses weighted by their samples (as across processes, where
every process's aux loss is its own), not the aux loss of the whole batch, which is not a sum over samples; likewise
an expert capacity counts a chunk's tokens, so MoE layers route per chunk as they route per process. Parameters
the task trains itself (distillation's projection) get their gradient in step 2. A tower that trains nothing
(``train.freeze``, LiT) is not run again in step 3 unless the task's forward joins the towers (``Task.joint``:
CoCa's decoder reads both): its embeddings from step 1 are final.

The cost: one more forward per step without graph (about a third of a training step); the memory: one chunk's
activations plus the batch's embeddings and the loss's logits (see ``SigLipLoss(block=...)`` for a sigmoid loss
whose logits do not grow with the batch).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from ..models import ModelOutput
from ..models.patches import Patches
from .tasks import Batch, Task

__all__ = ["GradCache", "chunk_bounds"]


def chunk_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(n)`` in pieces of ``chunk`` (the last may be shorter)."""
    return [(a, min(a + chunk, n)) for a in range(0, n, chunk)]


class _Rng:
    """The random state a forward draws from: the CPU generator and, on CUDA, the device's."""

    def __init__(self, device: torch.device):
        self.cuda = device if device.type == "cuda" else None

    def get(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self.cuda) if self.cuda is not None else None

    def set(self, state: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        torch.set_rng_state(state[0])
        if self.cuda is not None:
            torch.cuda.set_rng_state(state[1], self.cuda)


def _trains(core: nn.Module, tower: str) -> bool:
    """Whether any parameter of ``core.<tower>`` trains (True for a model without that tower: run it)."""
    module = getattr(core, tower, None)
    return not isinstance(module, nn.Module) or any(p.requires_grad for p in module.parameters())


def _leaf(t: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
    return None if t is None else t.detach().requires_grad_(grad)


def _dot(a: torch.Tensor | None, g: torch.Tensor | None) -> torch.Tensor | float:
    """``sum(a * g)`` in fp32: the surrogate whose gradient with respect to ``a`` is ``g``."""
    return 0.0 if a is None or g is None else (a.float() * g.float()).sum()


class GradCache:
    """One step of a task over a batch in chunks (see the module docstring).

    ``model`` is what the step runs in the second pass (the DDP-wrapped or compiled model), ``core`` the plain
    model (the graph-free first pass), ``task`` the run's objective, ``autocast`` the step's autocast context,
    ``scale`` the gradient scaler's ``scale`` (identity without fp16), ``no_sync`` DDP's no-sync context for all
    but the step's last backward."""

    def __init__(self, model: nn.Module, core: nn.Module, task: Task, chunk: int, *, device: torch.device,
                 autocast: Callable[[], AbstractContextManager],
                 scale: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                 no_sync: Callable[[], AbstractContextManager] = nullcontext):
        self.model, self.core, self.task, self.chunk = model, core, task, chunk
        self.autocast, self.scale, self.no_sync = autocast, scale, no_sync
        self.rng = _Rng(torch.device(device))
        self.times = {"first_pass_s": 0.0, "loss_s": 0.0, "second_pass_s": 0.0}  # summed since the last log_record()
        self.chunks = 0

    def log_record(self, elapsed: float) -> dict[str, float]:
        """For the trainer's log: the chunks per batch and each part's share of the ``elapsed`` seconds since the
        last record (the graph-free first pass, the batch loss and its gradient, the second pass); resets."""
        rec = {"grad_cache_chunks": float(self.chunks)}
        rec.update({f"{k.removesuffix('_s')}_share": v / max(elapsed, 1e-9) for k, v in self.times.items()})
        self.times = dict.fromkeys(self.times, 0.0)
        return rec

    def _now(self) -> float:
        """A time stamp at a phase boundary (on CUDA after a synchronise: the phases' shares are the device's)."""
        if self.rng.cuda is not None:
            torch.cuda.synchronize(self.rng.cuda)
        return time.perf_counter()

    def step(self, batch: Batch, *, divide: int = 1, sync: bool = True) -> tuple[dict[str, torch.Tensor], ModelOutput]:
        """Forward + backward of one batch; gradients are accumulated into the parameters (``/ divide``: the
        trainer's gradient accumulation). ``sync``: whether this is the optimizer step's last backward (DDP
        reduces the gradients in it). Returns the detached terms, their derived entries and ``loss`` (as the plain
        step names them) and the last chunk's model output (MoE routing statistics for the log)."""
        bounds = chunk_bounds(batch["tokens"].shape[0], self.chunk)
        self.chunks = len(bounds)
        t0 = self._now()
        states, full = self._first_pass(batch, bounds)
        after = self.rng.get()  # where the step's random stream continues
        t1 = self._now()
        terms, cached = self._batch_loss(full, batch, divide)
        t2 = self._now()
        local, out = self._second_pass(batch, bounds, states, cached, divide, sync)
        self.rng.set(after)
        t3 = self._now()
        for k, dt in zip(self.times, (t1 - t0, t2 - t1, t3 - t2)):
            self.times[k] += dt
        terms.update(local)
        terms.update(self.task.log_terms(terms))
        terms["loss"] = self.task.combine(terms)
        return terms, out

    def _first_pass(self, batch: Batch, bounds: list[tuple[int, int]]) -> tuple[list, ModelOutput]:
        """Every chunk's embeddings without a graph, and the random state each chunk started from; returns the
        states and the batch's embeddings as leaves (requiring a gradient where the second pass uses it) with the
        logit scale / bias as leaves."""
        core = self.core
        states, img_parts, txt_parts = [], [], []
        with torch.no_grad():
            for a, b in bounds:
                states.append(self.rng.get())
                with self.autocast():
                    out = self.task.forward(core, _chunk(batch, a, b), embed_only=True)
                img_parts.append(out.image_emb)
                txt_parts.append(out.text_emb)
        self.run_img = self.task.joint or _trains(core, "vision")  # a decoder needs both towers' outputs
        self.run_txt = self.task.joint or _trains(core, "text")
        scale_p, bias_p = core.logit_scale, getattr(core, "logit_bias", None)
        return states, ModelOutput(image_emb=_leaf(torch.cat(img_parts), self.run_img),
                                   text_emb=_leaf(torch.cat(txt_parts), self.run_txt),
                                   logit_scale=_leaf(scale_p.exp(), scale_p.requires_grad),
                                   logit_bias=_leaf(bias_p, bias_p is not None and bias_p.requires_grad))

    def _batch_loss(self, full: ModelOutput, batch: Batch, divide: int
                    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        """The batch terms (detached) and the (scaled) gradient of their share of the loss with respect to each
        leaf of ``full``; the task's own parameters receive theirs here."""
        terms = self.task.batch_terms(full, batch)
        names = [k for k in ("image_emb", "text_emb", "logit_scale", "logit_bias")
                 if getattr(full, k) is not None and getattr(full, k).requires_grad]
        cached: dict[str, torch.Tensor | None] = dict.fromkeys(("image_emb", "text_emb", "logit_scale", "logit_bias"))
        loss = self.task.combine(terms)
        params = [p for p in self.task.parameters() if p.requires_grad]
        if loss is not None and loss.requires_grad and (names or params):
            leaves = [getattr(full, k) for k in names]
            weighted = self.scale(loss / divide)
            torch.autograd.backward(weighted, inputs=leaves + params)
            cached.update((k, t.grad) for k, t in zip(names, leaves))
        return {k: v.detach() for k, v in terms.items()}, cached

    def _second_pass(self, batch: Batch, bounds: list[tuple[int, int]], states: list,
                     cached: dict[str, torch.Tensor | None], divide: int, sync: bool
                     ) -> tuple[dict[str, torch.Tensor], ModelOutput]:
        """Each chunk again with its graph and its random state, back-propagating ``<embeddings, cached
        gradients>`` plus its share of the local terms; returns those terms (detached) and the last output."""
        chunks = [_chunk(batch, a, b) for a, b in bounds]
        units = [self.task.local_units(c) for c in chunks]
        totals = {k: sum(u[k] for u in units) for k in units[0]}
        sums: dict[str, torch.Tensor] = {}
        out = None
        for i, ((a, b), chunk) in enumerate(zip(bounds, chunks)):
            self.rng.set(states[i])
            with nullcontext() if sync and i == len(bounds) - 1 else self.no_sync():
                with self.autocast():
                    run = {**chunk, "images": chunk["images"] if self.run_img else None,
                           "tokens": chunk["tokens"] if self.run_txt else None}
                    out = self.task.forward(self.model, run)
                g_img, g_txt = cached["image_emb"], cached["text_emb"]
                surrogate = _dot(out.image_emb, None if g_img is None else g_img[a:b]) + \
                    _dot(out.text_emb, None if g_txt is None else g_txt[a:b])
                # the scale and bias enter every chunk's graph (a share of their cached gradient each), so every
                # trained parameter is used in every backward (DDP needs it) and their gradients sum to the cached
                surrogate = surrogate + (_dot(out.logit_scale, cached["logit_scale"]) +
                                         _dot(out.logit_bias, cached["logit_bias"])) / len(bounds)
                extra = []  # the chunk's local terms, each weighted by the chunk's share of its units
                for k, term in self.task.local_terms(out, chunk).items():
                    share = units[i][k] / max(totals[k], 1)
                    extra.append(self.task.combine({k: term}) * share)
                    sums[k] = sums.get(k, 0) + term.detach() * share
                total = surrogate + (self.scale(sum(extra) / divide) if extra else 0.0)
                if torch.is_tensor(total) and total.requires_grad:
                    total.backward()
        return sums, out


def _chunk(batch: Batch, a: int, b: int) -> Batch:
    """Rows ``a:b`` of a batch's tensors, NaFlex patches and lists (images, tokens, keys, texts)."""
    return {k: v[a:b] if isinstance(v, (torch.Tensor, Patches, list)) else v for k, v in batch.items()}
