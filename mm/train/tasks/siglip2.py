"""The SigLIP 2 recipe's objectives around the run's own (contrastive, or CoCa's whose decoder then trains on LocCa's
three prompted tasks): global-local self-distillation and masked prediction against an EMA teacher, each switched on
at its start fraction of the run (``train.objectives``; Tschannen et al. 2025, after SILC and TIPS).

- **Decoder (LocCa)**: the data workers write each sample's decoder sequence (caption, referring expression -> box
  tokens, box tokens -> region caption: mm/data/locca.py, mm/data/views.py); the inner CoCa task reads them in place
  of the captions and its caption term is the decoder's token cross-entropy over the targets (``caption_loss``).
- **Self-distillation** (``self_distill_loss``): the student's embeddings of the sample's local crops and the
  teacher's embedding of its global view (the run's usual crop) go through DINO heads (an MLP, a normalised
  bottleneck, cosine logits over learned prototypes); the loss is the cross-entropy between the teacher's softmax
  (its outputs centred by a running mean and sharpened by a low temperature) and the student's, averaged over the
  crops. The student's crops run through the image tower in the same forward as the batch (``views``).
- **Masked prediction** (``masked_loss``): the student sees the global view with a share of its patch embeddings
  replaced by a learned mask token; at the masked positions its patch features, through a patch head, match the
  teacher's patch features of the unmasked view (same cross-entropy, a centre of its own).
- **Teacher**: an :class:`~.ema.EmaTeacher` of the image tower and both heads, made from the student when the first of
  the two starts; updated after every optimizer step (``end_step``); no gradient; checkpointed with the heads, the
  mask token and the centres (``siglip2.safetensors``), so a resumed run continues exactly.

Every new term is a local term (per sample: gradient caching computes it per chunk, the sigmoid loss stays the
batch's). What the task trains itself (heads, mask token) is outside DDP: its gradients are averaged by hand.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...models import ImageTextModel, ImageView, ModelOutput
from ...utils import dist
from ..config import ObjectivesConfig
from .base import Batch, Task, Terms
from .ema import EmaTeacher

STATE_NAME = "siglip2.safetensors"


class ProjectionHead(nn.Module):
    """DINO's head: a 3-layer MLP (GELU) to a bottleneck, L2-normalised, then cosine logits against ``prototypes``
    normalised rows (DINO's weight-normalised last layer with its norm fixed at 1)."""

    def __init__(self, dim: int, prototypes: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(prototypes, bottleneck) * bottleneck ** -0.5)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).t()


def distill_ce(student: torch.Tensor, teacher: torch.Tensor, center: torch.Tensor, student_temp: float,
               teacher_temp: float, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_rows( -sum_k softmax((teacher - center) / tt)_k * log_softmax(student / ts)_k )`` in fp32; the teacher's
    side carries no gradient. ``weight`` (rows,): a weighted mean instead (0 leaves a row out, exactly)."""
    target = F.softmax((teacher.detach().float() - center) / teacher_temp, dim=-1)
    ce = -(target * F.log_softmax(student.float() / student_temp, dim=-1)).sum(-1)
    return ce.mean() if weight is None else (ce * weight).sum() / weight.sum()


class Siglip2Task(Task):
    """``inner`` (the run's contrastive or CoCa task) plus the scheduled objectives of ``objectives`` over a run of
    ``steps`` optimizer steps. ``model`` is the unwrapped student (its image tower is what the teacher follows)."""

    def __init__(self, inner: Task, objectives: ObjectivesConfig, model: ImageTextModel, steps: int,
                 device: torch.device | str = "cpu"):
        self.inner, self.o, self.steps, self.model = inner, objectives, steps, model
        self.name, self.joint = inner.name, inner.joint
        dev = torch.device(device)
        cfg = model.config
        te = objectives.teacher
        self.heads = nn.ModuleDict()
        sd, mk = objectives.self_distill, objectives.masked
        if sd is not None:
            self.heads["global"] = ProjectionHead(cfg.embed_dim, sd.prototypes, te.head_hidden, te.head_bottleneck)
        if mk is not None:
            width = cfg.vision.transformer.width
            self.heads["patch"] = ProjectionHead(width, mk.prototypes, te.head_hidden, te.head_bottleneck)
            self.mask_token = nn.Parameter(nn.init.trunc_normal_(torch.zeros(width, device=dev), std=0.02))
        else:
            self.mask_token = None
        self.heads.to(dev)
        self.centers = {k: torch.zeros(o.prototypes, device=dev) for k, o in (("global", sd), ("patch", mk))
                        if o is not None}
        self._sums: dict[str, list] = {}  # this step's teacher outputs: name -> [sum over rows, rows]
        self.teacher: EmaTeacher | None = None
        self.active: dict[str, bool] = {}
        self.begin_step(0)

    # -- schedule ----------------------------------------------------------------------------------------------
    def _start_step(self, fraction: float) -> int:
        return int(round(fraction * self.steps))

    def begin_step(self, step: int) -> None:
        """Which objectives are on for optimizer step ``step`` (0-based); the teacher is made when its first one
        starts (from the student as it is then)."""
        o = self.o
        self.active = {name: obj is not None and step >= self._start_step(obj.start)
                       for name, obj in (("decoder", o.decoder), ("self_distill", o.self_distill),
                                         ("masked", o.masked))}
        if hasattr(self.inner, "decoder_on"):
            self.inner.decoder_on = self.active["decoder"] or o.decoder is None
        if self.teacher is None and (self.active["self_distill"] or self.active["masked"]):
            self.teacher = self._new_teacher()
        self._sums = {}
        self.inner.begin_step(step)

    def _new_teacher(self) -> EmaTeacher:
        te, start = self.o.teacher, self._start_step(self.o.teacher_start())
        source = nn.ModuleDict({"vision": self.model.vision, "heads": self.heads})
        end = te.momentum if te.momentum_end is None else te.momentum_end
        return EmaTeacher(source, max(1, self.steps - start), te.momentum, end)

    def end_step(self, step: int) -> None:
        """After optimizer step ``step`` (1-based count of steps done): the teacher follows the student, the centres
        the teacher's outputs of this step (averaged over every process)."""
        if self.teacher is not None:
            self.teacher.update(step - self._start_step(self.o.teacher_start()))
        for name, (total, rows) in sorted(self._sums.items()):
            both = torch.cat([total, rows.reshape(1)])
            if dist.world_size() > 1:
                torch.distributed.all_reduce(both)
            obj = self.o.self_distill if name == "global" else self.o.masked
            m = obj.center_momentum
            self.centers[name].mul_(m).add_((1 - m) * both[:-1] / both[-1].clamp_min(1))
        self._sums = {}
        self.inner.end_step(step)

    # -- forward and terms -------------------------------------------------------------------------------------
    def forward(self, module: nn.Module, batch: Batch, embed_only: bool = False, **model_kwargs: Any) -> ModelOutput:
        if embed_only:
            return self.inner.forward(module, batch, True)
        views: dict[str, ImageView] = {}
        images = batch.get("images")
        if images is not None and self.active["self_distill"]:
            views["local"] = ImageView(batch["local_images"].flatten(0, 1))
        if images is not None and self.active["masked"]:
            views["masked"] = ImageView(images, batch["patch_mask"], self.mask_token)
        out = self.inner.forward(module, batch, False, **model_kwargs, **({"views": views} if views else {}))
        if views:
            with torch.no_grad():
                teacher = self.teacher.module["vision"](images)
            out.views = {**(out.views or {}), "teacher": teacher}
        return out

    def batch_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        return self.inner.batch_terms(out, batch)

    def local_terms(self, out: ModelOutput, batch: Batch) -> Terms:
        terms = self.inner.local_terms(out, batch)
        views = out.views or {}
        heads = self.teacher.module["heads"] if self.teacher is not None else None
        if "local" in views:
            o = self.o.self_distill
            with torch.no_grad():
                t = heads["global"](views["teacher"].emb.float())
            self._accumulate("global", t)
            s = self.heads["global"](views["local"].emb.float())
            t = t.repeat_interleave(o.local_views, dim=0)  # each sample's crops against its global view
            terms["self_distill_loss"] = distill_ce(s, t, self.centers["global"], o.student_temp, o.teacher_temp)
        if "masked" in views:
            # every patch through the heads, the masked ones weighted 1 and the others 0: no boolean indexing (a
            # device-to-host sync on GPUs) in the step
            o, weight = self.o.masked, batch["patch_mask"].flatten().float()
            with torch.no_grad():
                t = heads["patch"](views["teacher"].tokens.flatten(0, 1).float())
            self._accumulate("patch", t, weight)
            s = self.heads["patch"](views["masked"].tokens.flatten(0, 1).float())
            terms["masked_loss"] = distill_ce(s, t, self.centers["patch"], o.student_temp, o.teacher_temp, weight)
        return terms

    def _accumulate(self, name: str, teacher_logits: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """This step's sum of the teacher's outputs (the rows ``weight`` selects) and their count, for the centre."""
        t = teacher_logits.detach().float()
        if weight is None:
            total, rows = t.sum(0), torch.tensor(float(t.shape[0]), device=t.device)
        else:
            total, rows = (t * weight[:, None]).sum(0), weight.sum()
        if name in self._sums:
            self._sums[name][0] += total
            self._sums[name][1] += rows
        else:
            self._sums[name] = [total, rows]

    def local_units(self, batch: Batch) -> dict[str, float]:
        units = self.inner.local_units(batch)
        if self.active.get("self_distill"):
            units["self_distill_loss"] = float(batch["local_images"].shape[0])
        if self.active.get("masked"):
            units["masked_loss"] = float(batch["patch_mask"].sum())
        return units

    def combine(self, terms: Terms) -> torch.Tensor | None:
        total = self.inner.combine(terms)
        for key, obj in (("self_distill_loss", self.o.self_distill), ("masked_loss", self.o.masked)):
            if key in terms:
                part = obj.weight * terms[key]
                total = part if total is None else total + part
        return total

    def log_terms(self, terms: Terms) -> Terms:
        return self.inner.log_terms(terms)

    # -- what the task trains and keeps --------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        own = [*self.heads.parameters(), *([self.mask_token] if self.mask_token is not None else [])]
        return [*self.inner.parameters(), *own]

    def state(self) -> dict[str, torch.Tensor]:
        out = {f"heads.{k}": v for k, v in self.heads.state_dict().items()}
        out.update({f"center.{k}": v for k, v in self.centers.items()})
        if self.mask_token is not None:
            out["mask_token"] = self.mask_token.data
        return out

    def save(self, directory: str | Path) -> None:
        from safetensors.torch import save_file

        self.inner.save(directory)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state().items()},
                  str(Path(directory) / STATE_NAME))
        if self.teacher is not None:
            self.teacher.save(directory)

    def load(self, directory: str | Path) -> None:
        from safetensors.torch import load_file

        from .ema import STATE_NAME as TEACHER_NAME

        self.inner.load(directory)
        path = Path(directory) / STATE_NAME
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; the checkpoint was written without train.objectives")
        state = load_file(str(path))
        with torch.no_grad():
            self.heads.load_state_dict({k[6:]: v for k, v in state.items() if k.startswith("heads.")})
            for k in self.centers:
                self.centers[k].copy_(state[f"center.{k}"])
            if self.mask_token is not None:
                self.mask_token.copy_(state["mask_token"])
        if (Path(directory) / TEACHER_NAME).is_file():
            self.teacher = self.teacher or self._new_teacher()
            self.teacher.load(directory)

    def describe(self) -> str | None:
        parts = []
        for name, obj in (("decoder", self.o.decoder), ("self_distill", self.o.self_distill), ("masked", self.o.masked)):
            if obj is not None:
                parts.append(f"{name} (weight {obj.weight}, from step {self._start_step(obj.start)})")
        inner = self.inner.describe()
        return "; ".join(([inner] if inner else []) + [f"objectives: {', '.join(parts)}"])
