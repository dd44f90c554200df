"""Distillation in a training run (the ``distill`` section): a frozen teacher's embeddings for every batch,
and the distillation loss (:class:`mm.losses.DistillLoss`) around the run's usual loss.

The teacher is any model ``load_model`` takes (an mm directory, ``open_clip:NAME[:TAG]``, a preset with a
weights file; also an open_clip model mm runs through open_clip, since a teacher only encodes), in eval mode,
without gradients, outside the optimizer and the checkpoints. It sees the student's batch: images adapted to
its own preprocessing (un-normalised with the student's mean / std, resized bicubically to its image size,
normalised with its own), captions re-tokenized with its own tokenizer when its tokenizer or context length
differs. Its embeddings may instead come from disk: ``mm embed --images`` over the training shards (ids are the
shard keys, so samples are matched by key) and ``mm embed --texts`` over the training captions (matched by
the text itself). Precomputed image embeddings are of the teacher's eval view of each image,
not of the student's augmented crop.

The only trained part is the feature loss's projection (student width -> teacher width, when they differ):
its own optimizer group, its gradient averaged over processes by the task (it is not inside DDP), and its weights
saved in each checkpoint as ``distill.safetensors`` (a resumed run continues it; ``final/`` holds the
student alone).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, load_file
from ..hub import PretrainedError, load_config, load_model, parse_spec
from ..hub.wrapped import WrappedConfig, wrapped_config
from ..losses import DistillLoss
from ..models import ModelConfig, NotNative, list_models, resolve_config
from ..hub.open_clip_configs import open_clip_model_names
from ..tokenizer import get_tokenizer
from .config import DistillConfig, RunConfig

STATE_NAME = "distill.safetensors"


class DistillError(RuntimeError):
    """A training batch has no teacher embedding on disk."""


# -- checks before any work ---------------------------------------------------------------------------
def teacher_config(spec: str) -> ModelConfig | WrappedConfig | None:
    """The teacher's architecture (None for an open_clip name mm has no preset of); ConfigError if ``spec``
    names nothing loadable. A teacher only encodes, so an open_clip model mm runs through open_clip (ConvNeXt,
    ResNet, ...) is one too: its :class:`~mm.hub.wrapped.WrappedConfig`."""
    s = parse_spec(spec)
    if s.kind == "dir":
        try:
            return load_config(spec)
        except PretrainedError as e:
            raise ConfigError(str(e)) from None
    if s.kind == "open_clip" and s.name not in list_models():
        import open_clip

        if s.name not in open_clip.list_models():
            raise ConfigError(f"{spec!r}: open_clip has no model {s.name!r}")
        return None
    name = s.name if s.kind == "open_clip" else spec
    try:
        return resolve_config(name)
    except NotNative:  # runs through open_clip: its interface config (widths, preprocessing, tokenizer)
        return wrapped_config(name if name in open_clip_model_names() else load_file(name))


def _teacher_dim(spec: str) -> int:
    cfg = teacher_config(spec)
    if cfg is not None:
        return cfg.embed_dim
    import open_clip

    return int(open_clip.get_model_config(parse_spec(spec).name)["embed_dim"])


def read_embed_index(directory: str | Path, kind: str) -> dict[str, Any]:
    """index.json of a finished ``mm embed`` output holding ``kind`` ("images" / "texts"); ConfigError if not."""
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise ConfigError(f"{directory}: no index.json (not a finished `mm embed` output directory)")
    index = json.loads(path.read_text())
    if index.get("kind") != kind:
        raise ConfigError(f"{directory}: holds {index.get('kind')} embeddings, expected {kind} "
                          f"(an `mm embed` output of {kind}: mm.inference.embed_{kind})")
    return index


def logit_scale_of(spec: str | None) -> float | None:
    """exp(logit_scale) read from an mm model directory's weights (no model is built); None otherwise."""
    if not spec or not (Path(spec) / "model.safetensors").is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(Path(spec) / "model.safetensors"), "pt") as f:
        return float(f.get_tensor("logit_scale").exp()) if "logit_scale" in f.keys() else None  # noqa: SIM118 (a safe_open handle has keys(), no `in`)


def check_sources(d: DistillConfig) -> Iterator[tuple[str, str]]:
    """(key, problem) pairs for a ``distill`` section's teacher and embedding directories (its values are
    ``DistillConfig.check``'s); file contents are read, no model is built."""
    dims: dict[str, int] = {}
    indexes: dict[str, dict] = {}
    for key, kind in (("image_embeddings", "images"), ("text_embeddings", "texts")):
        if getattr(d, key):
            try:
                indexes[key] = read_embed_index(getattr(d, key), kind)
                dims[key] = int(indexes[key]["embed_dim"])
            except ConfigError as e:
                yield key, str(e)
                return
    if d.teacher is None:
        if len(indexes) < 2:
            yield "teacher", "required unless both image_embeddings and text_embeddings are given"
            return
        if d.teacher_pretrained:
            yield "teacher_pretrained", "given without a teacher"
    else:
        try:
            dims["teacher"] = _teacher_dim(d.teacher)
        except ConfigError as e:
            yield "teacher", str(e)
            return
        if d.teacher_pretrained and not Path(d.teacher_pretrained).is_file():
            yield "teacher_pretrained", f"file {d.teacher_pretrained!r} not found"
        elif d.teacher_pretrained and Path(d.teacher).is_dir():
            yield "teacher_pretrained", f"{d.teacher} is a model directory and holds its weights; drop it"
        elif not d.teacher_pretrained and parse_spec(d.teacher).kind not in ("dir", "open_clip"):
            yield "teacher_pretrained", (f"teacher {d.teacher!r} is a preset or config file: give its weights file "
                                         "(random weights teach nothing)")
    if len(set(dims.values())) > 1:
        key = "image_embeddings" if "image_embeddings" in dims else "text_embeddings"
        yield key, f"embedding widths differ: {', '.join(f'{k} {v}' for k, v in dims.items())} (one teacher)"
    if d.teacher is None and d.temperature is None:
        models = {logit_scale_of(i.get("model")) for i in indexes.values()}
        if None in models or len(models) != 1:
            yield "temperature", ("needed: without distill.teacher the teacher's logit scale is read from the mm "
                                  "model directory the embeddings' index.json names, and there is none (or two)")


# -- precomputed embeddings ---------------------------------------------------------------------------
class EmbeddingStore:
    """The rows of an ``mm embed`` output directory, looked up by id: shard sample keys (images) or the
    text itself (texts, whose ids are ``"LINE: text"``). Parts are memory-mapped, not read whole."""

    def __init__(self, directory: str | Path, kind: str):
        self.directory, self.kind = Path(directory), kind
        index = read_embed_index(directory, kind)
        self.normalized, self.dim = bool(index.get("normalized", True)), int(index["embed_dim"])
        self.parts = [np.load(self.directory / p["file"], mmap_mode="r") for p in index["parts"]]
        self.rows: dict[str, tuple[int, int]] = {}
        for n, p in enumerate(index["parts"]):
            ids = json.loads((self.directory / p["ids"]).read_text())["ids"]
            for r, i in enumerate(ids):
                key = i.split(": ", 1)[1] if kind == "texts" else i
                if self.rows.setdefault(key, (n, r)) != (n, r) and kind == "images":
                    raise ConfigError(f"{directory}: the id {key!r} occurs twice; embed each shard once")
        self.scale = logit_scale_of(index.get("model"))

    def __len__(self) -> int:
        return len(self.rows)

    def lookup(self, keys: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """(len(keys), dim) float32, L2-normalised; DistillError naming the first key that is missing."""
        out = np.empty((len(keys), self.dim), np.float32)
        for j, k in enumerate(keys):
            at = self.rows.get(k)
            if at is None:
                what = "sample key" if self.kind == "images" else "caption"
                raise DistillError(f"{what} {k!r} of a training batch is not in {self.directory} (embed the "
                                   f"training {'shards' if self.kind == 'images' else 'captions'} with the teacher: "
                                   f"mm.inference.embed_{self.kind} or `mm embed`)")
            out[j] = self.parts[at[0]][at[1]]
        x = torch.from_numpy(out).to(device)
        return x if self.normalized else F.normalize(x, dim=-1)


# -- the run's distiller ------------------------------------------------------------------------------
class Distiller:
    """Teacher embeddings for a batch and the :class:`DistillLoss` terms against them (its weights, KL, feature
    loss and projection); :class:`mm.train.tasks.DistillTask` puts them around the run's other objective."""

    def __init__(self, d: DistillConfig, student: nn.Module, device: torch.device, autocast=nullcontext):
        self.cfg, self.device, self.autocast = d, torch.device(device), autocast
        self.teacher = None
        if d.teacher is not None:
            names = {"spec": "distill.teacher", "pretrained": "distill.teacher_pretrained"}  # for its messages
            self.teacher = load_model(d.teacher, d.teacher_pretrained, self.device, names=names).eval()
            self.teacher.requires_grad_(False)
        self.images = EmbeddingStore(d.image_embeddings, "images") if d.image_embeddings else None
        self.texts = EmbeddingStore(d.text_embeddings, "texts") if d.text_embeddings else None
        if self.teacher is not None:
            teacher_dim = self.teacher.config.embed_dim
            self.scale = float(self.teacher.logit_scale.detach().exp())
        else:
            teacher_dim = self.images.dim
            self.scale = self.images.scale or self.texts.scale or 1.0  # temperature set (checked) if unknown
        s_cfg = student.config
        self.tokenizer = None  # the teacher's, when the student's tokens are not its tokens
        if self.teacher is not None and _tokenizer_of(self.teacher.config) != _tokenizer_of(s_cfg):
            self.tokenizer = get_tokenizer(self.teacher)
        self.image_fix = _image_adapter(s_cfg, self.teacher.config) if self.teacher is not None else None
        self.loss = DistillLoss(None, s_cfg.embed_dim, teacher_dim, task_weight=d.task_weight,
                                kl_weight=d.kl_weight, feature_weight=d.feature_weight,
                                feature_loss=d.feature_loss, temperature=d.temperature).to(self.device)

    def parameters(self) -> list[nn.Parameter]:
        """The trained projection's parameters (none when the widths agree or feature_weight is 0)."""
        return list(self.loss.proj.parameters()) if self.loss.proj is not None else []

    def describe(self) -> str:
        src = [f"teacher {self.cfg.teacher}"] if self.teacher is not None else []
        src += [f"{s.kind} from {s.directory} ({len(s):,})" for s in (self.images, self.texts) if s is not None]
        return (f"distilling: {', '.join(src)}; kl {self.cfg.kl_weight}, feature {self.cfg.feature_weight} "
                f"({self.cfg.feature_loss}{', projected' if self.loss.proj is not None else ''}), "
                f"task {self.cfg.task_weight}, teacher logit scale {self.scale:.2f}")

    @torch.no_grad()
    def teacher_embeddings(self, batch: dict[str, Any], images: torch.Tensor,
                           tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """L2-normalised (B, D_teacher) image and text embeddings of the batch, from disk or the teacher."""
        if self.images is not None:
            img = self.images.lookup(batch["keys"], self.device)
        else:
            with self.autocast():
                img = self.teacher.encode_image(self.image_fix(images))
            img = F.normalize(img.float(), dim=-1)
        if self.texts is not None:
            txt = self.texts.lookup(batch["texts"], self.device)
        else:
            t_tokens = self.tokenizer(batch["texts"]).to(self.device) if self.tokenizer is not None else tokens
            with self.autocast():
                txt = self.teacher.encode_text(t_tokens)
            txt = F.normalize(txt.float(), dim=-1)
        return img, txt

    def save(self, directory: str | Path) -> None:
        """The projection into a checkpoint directory (nothing without one)."""
        if self.loss.proj is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous().cpu() for k, v in self.loss.proj.state_dict().items()},
                      str(Path(directory) / STATE_NAME))

    def load(self, directory: str | Path) -> None:
        if self.loss.proj is None:
            return
        path = Path(directory) / STATE_NAME
        if not path.is_file():
            raise DistillError(f"{path}: missing; the checkpoint was written without distillation's projection")
        from safetensors.torch import load_file

        where = "cpu" if self.device.type == "cpu" else str(self.device)  # safetensors refuses "cpu:0"
        self.loss.proj.load_state_dict(load_file(str(path), device=where))


def _tokenizer_of(cfg: ModelConfig | WrappedConfig) -> tuple[Any, ...]:
    """What decides a model's token ids for a caption: its tokenizer (CLIP BPE or a Hugging Face one, with its
    options) and its context length."""
    t = cfg.text
    return t.tokenizer, dict(t.tokenizer_kwargs or {}), t.context_length


def _image_adapter(student: ModelConfig, teacher: ModelConfig):
    """Student-preprocessed images -> the teacher's input (identity when the preprocessing is the same)."""
    sv, tv = student.vision, teacher.vision
    if sv.image_size == tv.image_size and tuple(sv.image_mean) == tuple(tv.image_mean) \
            and tuple(sv.image_std) == tuple(tv.image_std):
        return lambda x: x
    stats = [torch.tensor(v).view(3, 1, 1) for v in (sv.image_mean, sv.image_std, tv.image_mean, tv.image_std)]
    on_device: dict[torch.device, list[torch.Tensor]] = {}  # moved once per device, not every step

    def adapt(x: torch.Tensor) -> torch.Tensor:
        if x.device not in on_device:
            on_device[x.device] = [t.to(x.device) for t in stats]
        s_mean, s_std, t_mean, t_std = on_device[x.device]
        x = x.float() * s_std + s_mean  # back to [0, 1] pixels
        if x.shape[-1] != tv.image_size:
            x = F.interpolate(x, size=(tv.image_size, tv.image_size), mode="bicubic", antialias=True,
                              align_corners=False).clamp_(0, 1)
        return (x - t_mean) / t_std

    return adapt


def build_distiller(cfg: RunConfig, student: nn.Module, device: torch.device,
                    autocast=nullcontext) -> Distiller | None:
    """The run's distiller (None without a ``distill`` section)."""
    if cfg.distill is None:
        return None
    return Distiller(cfg.distill, student, device, autocast)
