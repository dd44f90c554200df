"""The training run's config: ``model``, ``data``, ``train``, ``eval``, ``distill``, ``finetune`` and ``output_dir``.

Plain dataclasses whose ``check()`` judges their own values only; what needs the file system or the model
(shards, checkpoints, teachers, parameter selectors) is checked by :mod:`mm.train.preflight`, which also reads
a YAML file + ``section.key=value`` overrides into a validated RunConfig (``load_run_config``).
"""
from __future__ import annotations

import re

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError
from ..data.decode import IMAGE_KEYS, MAX_PIXELS
from ..eval.config import EvalConfig, ShardReading
from ..hub import PretrainedError, load_config, parse_spec
from ..hub.wrapped import WrappedConfig, native_only, not_native_reason
from ..layers.config import LoraConfig
from ..models import ModelConfig, NotNative, list_models, resolve_config


@dataclass
class NaFlexData:
    """NaFlex training (SigLIP 2's native aspect ratio; mm/models/patches.py): each image is cut into patches on a
    grid of its own aspect ratio, at most a batch's sequence length of them, after a random crop; every batch draws
    its length from ``seq_lens`` and holds ``max_tokens // length`` images (mm/data/naflex.py: the same schedule on
    every rank, resumed exactly). The patch size is the model's."""

    seq_lens: list[int] = field(default_factory=lambda: [64, 144, 256])  # patches per image (sequence lengths)
    max_tokens: int = 8192  # patches per batch and process (padding included): batch size = max_tokens // length
    # the crop's aspect ratio relative to the image's own (data.crop_scale sets its area): [1, 1] keeps the image's
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.seq_lens or any(n < 1 for n in self.seq_lens):
            yield "seq_lens", f"must be one or more positive patch counts (the smallest grid is 1x1), got {self.seq_lens}"
        elif self.max_tokens < max(self.seq_lens):
            yield "max_tokens", (f"a budget of {self.max_tokens} patches is smaller than one image at sequence length "
                                 f"{max(self.seq_lens)}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            yield "crop_ratio", f"must satisfy 0 < min <= max, got {self.crop_ratio}"


@dataclass
class RetrievalData:
    """Retrieval-augmented captioning (SmallCap; mm/data/retrieved.py): the decoder reads ``k`` captions retrieved for
    the image, then writes the sample's caption (the loss is on the caption only). What each sample retrieved is
    read by its key from ``captions``, an `mm retrieve` output (JSON lines, its own captions excluded)."""

    captions: str = ""  # the `mm retrieve` output (.jsonl)
    k: int = 4  # retrieved captions in the prompt (0: plain captioning, for a baseline at the same context)
    caption_tokens: int = 30  # the most a target caption takes of the context; the retrieved share the rest

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.captions:
            yield "captions", "give the `mm retrieve` output (a .jsonl of retrieved captions per sample key)"
        if self.k < 0:
            yield "k", f"must be >= 0, got {self.k}"
        if self.caption_tokens < 1:
            yield "caption_tokens", f"must be >= 1, got {self.caption_tokens}"


@dataclass
class DataConfig:
    train: str | None = None  # shard URLs, brace-expanded: "dir/train-{000000..000009}.tar"; "::" joins sets
    # a file of sample keys, one a line (`mm curate filter`'s keep.txt): train only on the samples of data.train
    # listed there, without rewriting the shards (null: every sample)
    keep: str | None = None
    batch_size: int = 64  # per process
    workers: int = 2  # DataLoader worker processes per process (0 = load in the main process)
    shuffle_buffer: int = 1000  # sample shuffle buffer per worker (0 = only shard shuffling)
    resampled: bool = False  # draw shards with replacement (infinite stream) instead of epoch passes
    image_keys: list[str] = field(default_factory=lambda: list(IMAGE_KEYS))  # first one present
    text_key: str = "txt"  # the member holding the caption
    # train on a random one of the sample's json "captions" (re-drawn every epoch, reproducibly) instead
    # of text_key; samples without them fall back to text_key (Flickr/COCO-style multi-caption shards)
    random_caption: bool = False
    max_pixels: int = MAX_PIXELS  # larger images are skipped as decompression bombs (PIL's default)
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range
    # its aspect ratio range (width / height); with crop_scale [1, 1] and a range holding every image's aspect ratio
    # (e.g. [0.2, 5]), the whole image is squashed to the square input
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    # NaFlex: images at their own aspect ratio as patch sequences, batched by a token budget (null: square images of
    # the model's image_size, data.batch_size a batch); the run's evaluations read images at the longest length
    naflex: NaFlexData | None = None
    # retrieval-augmented captioning: the decoder's prompt holds captions retrieved for the image (null: none)
    retrieval: RetrievalData | None = None
    prefetch_factor: int = 4  # batches loaded ahead per worker
    # where training JPEGs are decoded and augmented: "workers" (PIL in the DataLoader workers) or
    # "device" (torchvision.io.decode_jpeg on the training device, batched: nvJPEG on CUDA; workers only
    # read headers and draw crops). Other formats are always decoded in the workers.
    decode: str = "workers"

    def check(self) -> Iterator[tuple[str, str]]:
        if self.batch_size < 1:
            yield "batch_size", f"must be >= 1, got {self.batch_size}"
        if self.workers < 0:
            yield "workers", f"must be >= 0, got {self.workers}"
        if self.shuffle_buffer < 0:
            yield "shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}"
        if self.decode not in ("workers", "device"):
            yield "decode", f"must be workers or device, got {self.decode!r}"
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            yield "crop_scale", f"must satisfy 0 < min <= max <= 1, got {self.crop_scale}"
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            yield "crop_ratio", f"must satisfy 0 < min <= max, got {self.crop_ratio}"
        if self.naflex is not None and self.decode == "device":
            yield "decode", "NaFlex patches are cut in the data workers: data.naflex needs decode: workers"

    def reading(self) -> ShardReading:
        """How evaluation reads shards in this run: with the training data's keys, limits and workers."""
        return ShardReading(workers=self.workers, prefetch_factor=self.prefetch_factor,
                            image_keys=tuple(self.image_keys), text_key=self.text_key, max_pixels=self.max_pixels,
                            seq_len=max(self.naflex.seq_lens) if self.naflex is not None else None)


@dataclass
class DecoderObjective:
    """LocCa's decoder (SigLIP 2; mm/data/locca.py): one decoder, three prompted tasks, drawn per sample with these
    probabilities (a referring / grounded draw on a sample without a visible region trains its caption)."""

    weight: float = 1.0  # of the decoder's token cross-entropy (it replaces train.caption_weight)
    start: float = 0.0  # on from this fraction of train.steps (above 0: one process only)
    caption: float = 0.5  # caption the image
    referring: float = 0.25  # a region's caption -> its box (box tokens: model.decoder.loc_bins)
    grounded: float = 0.25  # a region's box -> its caption

    def check(self) -> Iterator[tuple[str, str]]:
        yield from _weight_start(self)
        probs = (self.caption, self.referring, self.grounded)
        if any(p < 0 for p in probs) or sum(probs) <= 0:
            yield "caption", f"task probabilities must be >= 0 with a positive sum, got {probs}"

    def tasks(self) -> tuple[tuple[str, float], ...]:
        return tuple((k, getattr(self, k)) for k in ("caption", "referring", "grounded") if getattr(self, k) > 0)


@dataclass
class SelfDistillObjective:
    """Global-local self-distillation (SILC, as SigLIP 2 uses it): the student's embeddings of local crops match the
    EMA teacher's embedding of the global view, through DINO-style heads (softmax over prototypes, the teacher's
    centred and sharpened), mm/train/tasks/siglip2.py."""

    weight: float = 1.0  # SigLIP 2: 1
    start: float = 0.8  # SigLIP 2: the last 20% of training
    local_views: int = 2  # local crops per sample, at the model's input size (SILC: 8 at a lower resolution)
    local_scale: tuple[float, float] = (0.05, 0.4)  # their RandomResizedCrop area range (SILC's)
    prototypes: int = 1024  # the heads' output width (DINO: 65536)
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9  # of the teacher outputs' running mean, subtracted before the softmax

    def check(self) -> Iterator[tuple[str, str]]:
        yield from _weight_start(self)
        yield from _head_values(self)
        if self.local_views < 1:
            yield "local_views", f"must be >= 1, got {self.local_views}"
        if not 0 < self.local_scale[0] <= self.local_scale[1] <= 1:
            yield "local_scale", f"must satisfy 0 < min <= max <= 1, got {self.local_scale}"


@dataclass
class MaskedObjective:
    """Masked prediction (TIPS / iBOT, as SigLIP 2 uses it): a share of the student's patches replaced by a learned
    mask token; at the masked positions its patch features match the EMA teacher's of the unmasked image."""

    weight: float = 0.25  # SigLIP 2: 0.25
    start: float = 0.8  # SigLIP 2: the last 20% of training
    ratio: float = 0.5  # share of the patches masked
    prototypes: int = 1024
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    center_momentum: float = 0.9

    def check(self) -> Iterator[tuple[str, str]]:
        yield from _weight_start(self)
        yield from _head_values(self)
        if not 0 < self.ratio < 1:
            yield "ratio", f"must be in (0, 1), got {self.ratio}"


@dataclass
class TeacherSettings:
    """The EMA teacher of the image tower and the heads (self-distillation and masked prediction share it), made from
    the student when the first of them starts."""

    momentum: float = 0.996  # teacher = m * teacher + (1 - m) * student after each step
    # rises on a cosine to this by the end of training; null = fixed (SILC: a momentum reaching 1 would stop the
    # teacher following the image-text loss)
    momentum_end: float | None = None
    head_hidden: int = 512  # the heads' MLP width
    head_bottleneck: int = 128  # the heads' last width before the prototypes

    def check(self) -> Iterator[tuple[str, str]]:
        end = self.momentum if self.momentum_end is None else self.momentum_end
        if not 0 <= self.momentum <= end <= 1:
            yield "momentum", f"must satisfy 0 <= momentum <= momentum_end <= 1, got {self.momentum}, {end}"
        if self.head_hidden < 1 or self.head_bottleneck < 1:
            yield "head_hidden", f"head widths must be >= 1, got {self.head_hidden}, {self.head_bottleneck}"


@dataclass
class ObjectivesConfig:
    """The SigLIP 2 recipe's objectives besides the contrastive loss, each on from its start (a fraction of
    train.steps) with its weight; a null section is off. docs/training_tasks.md."""

    decoder: DecoderObjective | None = None  # LocCa (needs a model with a decoder; referring / grounded: box tokens)
    self_distill: SelfDistillObjective | None = None  # global-local self-distillation against the EMA teacher
    masked: MaskedObjective | None = None  # masked prediction of the EMA teacher's patch features
    teacher: TeacherSettings = field(default_factory=TeacherSettings)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.decoder is None and self.self_distill is None and self.masked is None:
            yield "decoder", "no objective is set (decoder, self_distill, masked); leave train.objectives null instead"

    def teacher_start(self) -> float | None:
        """When the EMA teacher is made: the first of self_distill / masked to start (None: neither is set)."""
        starts = [o.start for o in (self.self_distill, self.masked) if o is not None]
        return min(starts) if starts else None


def _weight_start(o: Any) -> Iterator[tuple[str, str]]:
    if o.weight < 0:
        yield "weight", f"must be >= 0, got {o.weight}"
    if not 0 <= o.start < 1:
        yield "start", f"must be a fraction of train.steps in [0, 1), got {o.start}"


def _head_values(o: Any) -> Iterator[tuple[str, str]]:
    if o.prototypes < 2:
        yield "prototypes", f"must be >= 2, got {o.prototypes}"
    for k in ("student_temp", "teacher_temp"):
        if getattr(o, k) <= 0:
            yield k, f"must be > 0, got {getattr(o, k)}"
    if not 0 <= o.center_momentum < 1:
        yield "center_momentum", f"must be in [0, 1), got {o.center_momentum}"


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 5e-4  # peak learning rate (AdamW), reached after warmup_steps
    warmup_steps: int = 100  # linear warmup from 0, then cosine decay to min_lr at steps
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.2  # AdamW; not applied to biases, norms, embeddings, logit scale/bias
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW
    eps: float = 1e-6  # AdamW
    # fp32 | bf16 | fp16 | auto (bf16 on a GPU and on a CPU with native bf16 arithmetic, AVX-512 BF16 / AMX; fp32 on
    # other CPUs, which emulate bf16 ~20x slower than fp32): resolved when the config is loaded
    precision: str = "fp32"
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch: batch_size x processes x grad_accum)
    grad_clip: float | None = 1.0  # max global grad norm; null = off
    # gradient caching (mm/train/grad_cache.py): run the model in chunks of this many samples per process (two
    # passes: embeddings without graphs, then each chunk again with its graph) while the contrastive loss and its
    # gradients are the whole batch's, exactly: batches larger than memory; null = one pass over the batch
    grad_cache_chunk: int | None = None
    seed: int = 0  # initial weights, data order, augmentation and dropout
    loss: str = "clip"  # clip | siglip
    # an objective of your own, "module:factory" (factory(cfg, model, device) -> mm.train.tasks.Task, module
    # importable from the run's working directory); null = the model's own: contrastive (train.loss), CoCa's
    # with a decoder; docs/training_tasks.md shows one
    objective: str | None = None
    local_loss: bool = False  # clip loss: each process scores only its own rows against all (less memory)
    # siglip loss: compute the (local x world batch) logits in tiles of this size, forward and backward, so the
    # loss's memory does not grow with the batch (same value and gradients); null = all logits at once
    loss_block: int | None = None
    aux_weight: float = 1.0  # weight of the model's MoE aux loss
    # CoCa models (model.decoder set): loss = contrastive_weight * (clip|siglip) + caption_weight * token CE
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0  # CoCa: weight of the caption token cross-entropy
    label_smoothing: float = 0.0  # of the caption cross-entropy (a fine-tuning run's: of the class cross-entropy)
    # CoCa: the share of each (micro-)batch's rows the captioning decoder is trained on (the first
    # ceil(f * rows), a random subset of a shuffled stream); the contrastive loss still uses every row. The
    # decoder, LM head and caption loss cost scale with it (half of a tiny-coca step on the CPU at 1.0)
    caption_fraction: float = 1.0
    checkpoint_every: int = 500  # steps; 0 = only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept; older ones are deleted
    resume: str = "auto"  # auto (newest complete checkpoint in output_dir) | none | a checkpoint path
    stop_after: int | None = None  # end this run (with a checkpoint) after this step; resume later
    compile: bool = False  # torch.compile the model
    grad_checkpointing: bool = False  # recompute activations in backward, per block (less memory)
    # shard parameters, gradients and optimizer state over the processes (FSDP2, one unit per block, under a
    # multi-GPU / multi-CPU launch; mm/train/fsdp.py); evaluation and saving gather the weights to the main process
    fsdp: bool = False
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    log_every: int = 10  # steps between metrics.jsonl records (and MoE routing statistics)
    # Adapting a pretrained model (mm/train/adapt.py). Start from these weights: an mm model directory,
    # open_clip:NAME[:TAG], or an mm / open_clip weights file (.safetensors, .pt); the optimizer starts fresh,
    # and a resumed run's own checkpoint takes precedence. With `model` unset, a directory's or open_clip
    # NAME's architecture is used.
    init_from: str | None = None
    # towers (vision, text, decoder, logit_scale...) or parameter-name globs (vision.transformer.blocks.[0-3].*)
    # to freeze: no gradient, not in the optimizer, kept in eval mode (LiT: [vision]); the last entry matching a
    # parameter decides, and one starting with ! keeps it trainable (["*", "!decoder.*.cross_attn.*"]: only the
    # decoder's cross-attention trains, as SmallCap)
    freeze: list[str] = field(default_factory=list)
    # learning-rate multiplier per tower or glob, e.g. {text: 0.5}; the last entry selecting a parameter wins
    lr_mult: dict[str, float] = field(default_factory=dict)
    # layer-wise lr decay (BEiT): block i of a depth-L stack gets decay^(L - i), embeddings decay^(L + 1),
    # heads (norm, pooling, projection, logit scale) 1; null = off
    layer_decay: float | None = None
    # low-rank adapters (mm/layers/lora.py): the base weights (train.init_from) frozen and out of the optimizer,
    # only the adapters trained; checkpoints hold the adapters and their optimizer state, final/ the adapter alone
    # in peft's layout (`mm merge` folds it into a model directory), e.g. {rank: 8, targets: ["*.attn"]}
    lora: LoraConfig | None = None
    # the SigLIP 2 recipe (mm/train/tasks/siglip2.py): LocCa's decoder tasks, self-distillation and masked
    # prediction against an EMA teacher, each with its weight and start; null = the model's own objective
    objectives: ObjectivesConfig | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        if self.steps < 1:
            yield "steps", f"must be >= 1, got {self.steps}"
        if self.lr <= 0:
            yield "lr", f"must be > 0, got {self.lr}"
        if self.warmup_steps < 0:
            yield "warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        if self.precision not in ("fp32", "bf16", "fp16", "auto"):
            yield "precision", f"must be fp32, bf16, fp16 or auto, got {self.precision!r}"
        if self.grad_accum < 1:
            yield "grad_accum", f"must be >= 1, got {self.grad_accum}"
        if not 0.0 <= self.label_smoothing < 1.0:
            yield "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"
        if self.contrastive_weight < 0 or self.caption_weight < 0:
            yield "caption_weight", (f"loss weights must be >= 0, got contrastive {self.contrastive_weight}, "
                                     f"caption {self.caption_weight}")
        if not 0.0 < self.caption_fraction <= 1.0:
            yield "caption_fraction", f"must be in (0, 1], got {self.caption_fraction}"
        if self.grad_clip is not None and self.grad_clip <= 0:
            yield "grad_clip", f"must be > 0 or null, got {self.grad_clip}"
        if self.loss not in ("clip", "siglip"):
            yield "loss", f"must be clip or siglip, got {self.loss!r}"
        if self.checkpoint_every < 0:
            yield "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}"
        if self.keep_checkpoints < 1:
            yield "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}"
        if self.max_bad_steps < 1:
            yield "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}"
        if self.fsdp and self.precision == "fp16":
            yield "fsdp", "train.fsdp needs fp32 or bf16 (fp16's gradient scaler does not handle sharded gradients)"
        for i, sel in enumerate(self.freeze):
            if not sel.strip():
                yield f"freeze[{i}]", "must be a tower name or a glob, got an empty string"
        for sel, mult in self.lr_mult.items():
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
                yield f"lr_mult.{sel}", f"must be a number > 0, got {mult!r}"
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            yield "layer_decay", f"must be in (0, 1] or null, got {self.layer_decay}"
        if self.lora is not None and self.freeze:
            yield "freeze", "does not apply with train.lora (everything but the adapters is frozen); leave it empty"
        if self.grad_cache_chunk is not None and self.grad_cache_chunk < 1:
            yield "grad_cache_chunk", f"must be >= 1 or null, got {self.grad_cache_chunk}"
        if self.objective is not None and not re.fullmatch(r"[\w.]+:\w+", self.objective):
            yield "objective", f"must be 'module:factory' (e.g. my_tasks:make_task), got {self.objective!r}"
        if self.objectives is not None and self.objective is not None:
            yield "objectives", "train.objective names the run's whole objective; leave train.objectives null with it"
        if self.loss_block is not None and (self.loss_block < 1 or self.loss != "siglip"):
            yield "loss_block", f"must be >= 1 and goes with loss: siglip (got {self.loss_block}, loss {self.loss})"


@dataclass
class DistillConfig:
    """Knowledge distillation from a frozen teacher (mm/train/distill.py, loss: mm.losses.DistillLoss).
    The teacher runs in eval mode without gradients; it is not in the optimizer, nor in checkpoints."""

    # mm model directory, open_clip:NAME[:TAG], or a preset / config file with teacher_pretrained; may be
    # null when both image_embeddings and text_embeddings are given
    teacher: str | None = None
    teacher_pretrained: str | None = None  # weights file (mm or open_clip) for a preset / config-file teacher
    # `mm embed --images` output over the training shards: the teacher's image embeddings, matched to
    # training samples by shard key (every training key must be there); null = the teacher computes them
    image_embeddings: str | None = None
    # `mm embed --texts` output: the teacher's text embeddings, matched to training captions by their text
    # (every caption must be there); null = the teacher computes them
    text_embeddings: str | None = None
    task_weight: float = 1.0  # weight of the run's usual loss (train.loss; CoCa's caption loss included)
    kl_weight: float = 1.0  # KL(teacher || student) of the in-batch image-text similarity distributions
    feature_weight: float = 0.0  # embedding matching (a learned projection when the widths differ)
    feature_loss: str = "cosine"  # cosine (1 - cos) | mse (squared L2 distance)
    # logits = sim / temperature for both models; null: each model's own logit scale (the teacher's is
    # read from its weights; with precomputed embeddings only, from the model their index.json names)
    temperature: float | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        """The values alone; the teacher and the embedding directories are checked by the preflight."""
        for k in ("task_weight", "kl_weight", "feature_weight"):
            if getattr(self, k) < 0:
                yield k, f"must be >= 0, got {getattr(self, k)}"
        if self.kl_weight == 0 and self.feature_weight == 0:
            yield "kl_weight", "kl_weight and feature_weight are both 0: nothing would be distilled"
        if self.feature_loss not in ("cosine", "mse"):
            yield "feature_loss", f"must be cosine or mse, got {self.feature_loss!r}"
        if self.temperature is not None and self.temperature <= 0:
            yield "temperature", f"must be > 0 or null (the models' logit scales), got {self.temperature}"


@dataclass
class FinetuneSection:
    """Classification fine-tuning (``mm finetune``, mm/train/finetune.py, which sets this section from its flags):
    the run trains ``head(encode_image(images))`` on the labelled shards of ``data.train``, the head started as the
    zero-shot classifier over ``classes``, then scores WiSE-FT interpolations on ``test``. Its own trained parts:
    the image encoder (or LoRA adapters on it) and the head; the text tower is not used."""

    # the model to fine-tune: an mm model directory, a preset or config file (weights: pretrained), open_clip:NAME
    model: str | None = None
    pretrained: str | None = None  # weights file (mm or open_clip) for a preset / config-file model
    adapter: str | None = None  # a LoRA adapter directory put on model and merged into it before fine-tuning
    classes: list[str] = field(default_factory=list)  # class names, in label order
    templates: list[str] | None = None  # zero-shot head prompts, {} for the class name; null: OpenAI's ImageNet ones
    label_key: str = "cls"  # the shard member holding the class index
    test: str | None = None  # labelled test shards, on which WiSE-FT is scored after training
    max_test: int | None = None  # score on the first N test samples; null: all
    # WiSE-FT interpolation weights to score: (1 - alpha) * zero-shot + alpha * fine-tuned
    wise_alpha: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    save_alpha: float | None = None  # also save the classifier at this alpha (wise-ALPHA/ beside finetuned/)
    head_lr_mult: float = 1.0  # the head's learning rate is train.lr times this
    # LoRA adapters on the image encoder's layers (targets there) train with the head, the base frozen
    lora: LoraConfig | None = None
    device: str | None = None  # cpu: on the CPU even where a GPU is; null: the process's accelerator device

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.model:
            yield "model", "the model to fine-tune is not set"
        if not self.classes:
            yield "classes", "no class names"
        if not self.test:
            yield "test", "no test shards"
        if not self.wise_alpha or any(not 0 <= a <= 1 for a in self.wise_alpha):
            yield "wise_alpha", f"alphas must lie in [0, 1], got {self.wise_alpha}"
        if self.save_alpha is not None and not 0 <= self.save_alpha <= 1:
            yield "save_alpha", f"must lie in [0, 1], got {self.save_alpha}"
        if self.max_test is not None and self.max_test < 1:
            yield "max_test", f"must be >= 1, got {self.max_test}"
        if self.head_lr_mult <= 0:
            yield "head_lr_mult", f"must be > 0, got {self.head_lr_mult}"
        if self.device not in (None, "cpu", "cuda"):
            yield "device", f"must be cpu or cuda (choose a GPU with CUDA_VISIBLE_DEVICES), got {self.device!r}"


@dataclass
class RunConfig:
    # preset name, config file or mapping; null: the architecture of train.init_from, else tiny-clip
    model: str | dict[str, Any] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig | None = None  # distillation from a teacher model; null = off
    # classification fine-tuning of the image encoder (mm finetune); null = an image-text run
    finetune: FinetuneSection | None = None
    output_dir: str = "runs/default"  # the run directory: config, metrics, checkpoints, final/, plots

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.data.train:
            yield "data.train", "no training shards given (set data.train=PATH-{000000..000009}.tar)"
        if self.distill is not None and self.distill.text_embeddings and self.data.random_caption:
            yield "distill.text_embeddings", ("precomputed text embeddings match the shards' text_key captions; "
                                              "data.random_caption trains on others (give distill.teacher instead)")

    def model_config(self) -> ModelConfig:
        """The run's architecture: ``model``; unset, the one ``train.init_from`` names; else tiny-clip. An open_clip
        model mm runs only through open_clip (``RN50``, ``convnext_base``, ...) cannot be trained: NotNative saying
        so, naming the part mm does not build."""
        try:
            if self.model is not None:
                return resolve_config(self.model)
            if self.train.init_from:
                return resolve_config(init_from_architecture(self.train.init_from))
            return resolve_config("tiny-clip")
        except NotNative as e:
            raise NotNative(native_only("training", str(e))) from None


def init_from_problem(spec: str) -> str | None:
    """Why ``train.init_from`` cannot be used, or None (only the file system is looked at)."""
    s = parse_spec(spec)
    if s.kind == "open_clip" and not s.name:
        return f"{spec!r}: expected open_clip:NAME or open_clip:NAME:TAG"
    if s.kind == "dir" and not (s.path / "config.json").is_file():
        return f"{spec!r} is a directory without config.json (not an mm model directory)"
    if s.kind not in ("dir", "open_clip") and not s.path.is_file():
        return f"{spec!r} does not exist (an mm model directory, a weights file or open_clip:NAME[:TAG])"
    return None


def init_from_architecture(spec: str) -> ModelConfig | str:
    """The architecture ``train.init_from`` implies when ``model`` is not set: an mm directory's own config,
    the preset of ``open_clip:NAME``. A bare weights file holds none: ConfigError."""
    problem = init_from_problem(spec)
    if problem:
        raise ConfigError(f"train.init_from: {problem}")
    s = parse_spec(spec)
    if s.kind == "dir":
        try:
            cfg = load_config(spec)
        except PretrainedError as e:
            raise ConfigError(f"train.init_from: {e}") from None
        if isinstance(cfg, WrappedConfig):
            raise NotNative(f"train.init_from {spec}: {not_native_reason(cfg)}")
        return cfg
    if s.kind == "open_clip":
        if s.name not in list_models():
            raise ConfigError(f"not set, and train.init_from {spec!r} names no mm preset: set model to the "
                              "architecture")
        return s.name
    raise ConfigError(f"not set, and train.init_from {spec!r} is a weights file, which holds no architecture: set "
                      "model to the preset it was trained as (e.g. model=ViT-B-32)")


def not_native(spec: str) -> str | None:
    """Why the model ``spec`` names (``--model``, ``train.init_from``) runs through open_clip (NotNative's
    message: the part mm does not build), or None: mm builds it, or ``spec`` names nothing loadable (loading it
    says what). Nothing is downloaded and no weights are read."""
    s = parse_spec(spec)
    if s.kind == "missing" or (s.kind == "file" and s.path.suffix.lower() not in (".yaml", ".yml", ".json")):
        return None  # nothing, or a weights file: no architecture to judge
    try:
        if s.kind == "dir":
            cfg = load_config(spec)
            return not_native_reason(cfg) if isinstance(cfg, WrappedConfig) else None
        resolve_config(s.name if s.kind == "open_clip" else spec)
    except NotNative as e:
        return str(e)
    except (ConfigError, PretrainedError, OSError):
        return None
    return None
