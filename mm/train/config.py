"""The training run's config: one YAML file + ``section.key=value`` overrides -> a validated RunConfig.

Sections: ``model`` (a preset name, a config file path or an inline mapping), ``data``, ``train``,
``eval`` and ``output_dir``. Everything is checked (unknown keys, types, values, that shard files and
class-name files exist) before any work starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..config import ConfigError, ModelConfig, apply_overrides, from_dict, load_file, parse_value, validate
from ..generate import GenerationConfig


@dataclass
class DataConfig:
    train: str | None = None  # shard URLs, brace-expanded: "dir/train-{000000..000009}.tar"; "::" joins sets
    batch_size: int = 64  # per process
    workers: int = 2  # DataLoader worker processes per process (0 = load in the main process)
    shuffle_buffer: int = 1000  # sample shuffle buffer per worker (0 = only shard shuffling)
    resampled: bool = False  # draw shards with replacement (infinite stream) instead of epoch passes
    image_keys: list[str] = field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])  # first one present
    text_key: str = "txt"  # the member holding the caption
    # train on a random one of the sample's json "captions" (re-drawn every epoch, reproducibly) instead
    # of text_key; samples without them fall back to text_key (Flickr/COCO-style multi-caption shards)
    random_caption: bool = False
    max_pixels: int = 89_478_485  # larger images are skipped as decompression bombs (PIL's default)
    crop_scale: tuple[float, float] = (0.9, 1.0)  # RandomResizedCrop area range
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


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    lr: float = 5e-4  # peak learning rate (AdamW), reached after warmup_steps
    warmup_steps: int = 100  # linear warmup from 0, then cosine decay to min_lr at steps
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.2  # AdamW; not applied to biases, norms, embeddings, logit scale/bias
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW
    eps: float = 1e-6  # AdamW
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch: batch_size x processes x grad_accum)
    grad_clip: float | None = 1.0  # max global grad norm; null = off
    seed: int = 0  # initial weights, data order, augmentation and dropout
    loss: str = "clip"  # clip | siglip
    local_loss: bool = False  # clip loss: each process scores only its own rows against all (less memory)
    aux_weight: float = 1.0  # weight of the model's MoE aux loss
    # CoCa models (model.decoder set): loss = contrastive_weight * (clip|siglip) + caption_weight * token CE
    contrastive_weight: float = 1.0
    caption_weight: float = 2.0  # CoCa: weight of the caption token cross-entropy
    label_smoothing: float = 0.0  # of the caption cross-entropy
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
    # to freeze: no gradient, not in the optimizer, kept in eval mode (LiT: [vision])
    freeze: list[str] = field(default_factory=list)
    # learning-rate multiplier per tower or glob, e.g. {text: 0.5}; the last entry selecting a parameter wins
    lr_mult: dict[str, float] = field(default_factory=dict)
    # layer-wise lr decay (BEiT): block i of a depth-L stack gets decay^(L - i), embeddings decay^(L + 1),
    # heads (norm, pooling, projection, logit scale) 1; null = off
    layer_decay: float | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        if self.steps < 1:
            yield "steps", f"must be >= 1, got {self.steps}"
        if self.lr <= 0:
            yield "lr", f"must be > 0, got {self.lr}"
        if self.warmup_steps < 0:
            yield "warmup_steps", f"must be >= 0, got {self.warmup_steps}"
        if self.precision not in ("fp32", "bf16", "fp16"):
            yield "precision", f"must be fp32, bf16 or fp16, got {self.precision!r}"
        if self.grad_accum < 1:
            yield "grad_accum", f"must be >= 1, got {self.grad_accum}"
        if not 0.0 <= self.label_smoothing < 1.0:
            yield "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}"
        if self.contrastive_weight < 0 or self.caption_weight < 0:
            yield "caption_weight", (f"loss weights must be >= 0, got contrastive {self.contrastive_weight}, "
                                     f"caption {self.caption_weight}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            yield "grad_clip", f"must be > 0 or null, got {self.grad_clip}"
        if self.loss not in ("clip", "siglip"):
            yield "loss", f"must be clip or siglip, got {self.loss!r}"
        if self.checkpoint_every < 0:
            yield "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}"
        if self.keep_checkpoints < 1:
            yield "keep_checkpoints", f"must be >= 1, got {self.keep_checkpoints}"
        if self.resume not in ("auto", "none") and not Path(self.resume).exists():
            yield "resume", f"checkpoint {self.resume!r} does not exist (use auto, none or a checkpoint path)"
        if self.max_bad_steps < 1:
            yield "max_bad_steps", f"must be >= 1, got {self.max_bad_steps}"
        if self.fsdp and self.compile:
            yield "fsdp", "train.fsdp with train.compile is not supported yet; set one of them to false"
        if self.fsdp and self.precision == "fp16":
            yield "fsdp", "train.fsdp needs fp32 or bf16 (fp16's gradient scaler does not handle sharded gradients)"
        if self.init_from:
            from .adapt import check_init_from

            problem = check_init_from(self.init_from)
            if problem:
                yield "init_from", problem
        for i, sel in enumerate(self.freeze):
            if not sel.strip():
                yield f"freeze[{i}]", "must be a tower name or a glob, got an empty string"
        for sel, mult in self.lr_mult.items():
            if isinstance(mult, bool) or not isinstance(mult, (int, float)) or not mult > 0:
                yield f"lr_mult.{sel}", f"must be a number > 0, got {mult!r}"
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            yield "layer_decay", f"must be in (0, 1] or null, got {self.layer_decay}"


@dataclass
class ZeroShotConfig:
    shards: str | None = None  # labelled shards (label in `label_key`)
    classnames: list[str] | str | None = None  # list, or a .txt / .json file; default: info.json "classes"
    templates: list[str] | str | None = None  # "{}" format strings or a file; default: info.json, else OpenAI's
    label_key: str = "cls"  # the member holding the class index
    max_samples: int | None = None  # the first N samples; null = all


@dataclass
class RetrievalConfig:
    shards: str | None = None  # samples whose `json` holds "captions": [...]
    max_samples: int | None = None  # the first N samples; null = all


@dataclass
class CaptioningConfig:
    """Caption the images of ``shards`` (CoCa models) and score them against the references: the json
    "captions" list of each sample, else its text. Logs caption_bleu4 and caption_cider."""

    shards: str | None = None  # images with reference captions; null = no captioning evaluation
    max_samples: int | None = None  # the first N samples; null = all
    show: int = 5  # example captions printed to the log (all are written to captions.jsonl)
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(num_beams=3, max_new_tokens=30))


@dataclass
class EvalConfig:
    every: int = 0  # steps between evaluations; 0 = only at the end
    batch_size: int = 256  # images per evaluation batch
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)


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
        from .distill import check_config

        yield from check_config(self)


@dataclass
class RunConfig:
    # preset name, config file or mapping; null: the architecture of train.init_from, else tiny-clip
    model: str | dict[str, Any] | None = None
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    distill: DistillConfig | None = None  # distillation from a teacher model; null = off
    output_dir: str = "runs/default"  # the run directory: config, metrics, checkpoints, final/, plots

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.data.train:
            yield "data.train", "no training shards given (set data.train=PATH-{000000..000009}.tar)"
        try:
            mcfg = self.model_config()
        except ConfigError as e:  # e.g. model unset and train.init_from without an architecture
            yield "model", str(e)
            return
        if self.train.loss == "siglip" and mcfg.init_logit_bias is None:
            yield "train.loss", "siglip needs a model with a logit bias (set model.init_logit_bias, e.g. -10)"
        if self.eval.captioning.shards and mcfg.decoder is None:
            yield "eval.captioning.shards", "captioning needs a model with a decoder (e.g. model: tiny-coca)"
        if self.distill is not None and self.distill.text_embeddings and self.data.random_caption:
            yield "distill.text_embeddings", ("precomputed text embeddings match the shards' text_key captions; "
                                              "data.random_caption trains on others (give distill.teacher instead)")
        if self.distill is not None and self.train.fsdp:
            yield "train.fsdp", "distillation with train.fsdp is not supported yet (its projection trains outside FSDP)"
        gen = self.eval.captioning.generation
        if gen.max_new_tokens is not None and gen.max_new_tokens >= mcfg.text.context_length:
            yield "eval.captioning.generation.max_new_tokens", (
                f"{gen.max_new_tokens} does not fit the model's context length {mcfg.text.context_length} "
                "(start token included)")

    def model_config(self) -> ModelConfig:
        from ..models.clip import resolve_config

        if self.model is not None:
            return resolve_config(self.model)
        if self.train.init_from:
            from .adapt import init_model_config

            return resolve_config(init_model_config(self.train.init_from))
        return resolve_config("tiny-clip")


def load_run_config(path: str | Path | None, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """YAML file (optional) + overrides (``["train.lr=1e-3", ...]`` or a dict) -> validated RunConfig.

    Also checks what can be checked without training: the model resolves, local shard files exist,
    class-name / template files exist.
    """
    data = load_file(path) if path else {}
    cfg = from_dict(RunConfig, data)
    if isinstance(overrides, dict):
        items = overrides
    else:
        items = {}
        for ov in overrides:
            if "=" not in ov:
                raise ConfigError(f"override {ov!r} is not of the form section.key=value")
            k, v = ov.split("=", 1)
            items[k.strip()] = v
    if items:
        # `model=ViT-B-32` replaces the model; `model.vision.patch_size=16` edits an inline mapping
        model_items = {k: v for k, v in items.items() if k.startswith("model.")}
        rest = {k: v for k, v in items.items() if not k.startswith("model.")}
        cfg = apply_overrides(cfg, rest) if rest else cfg
        if model_items:
            mcfg = apply_overrides(cfg.model_config(), {k[len("model."):]: v for k, v in model_items.items()})
            from ..config import to_dict

            cfg.model = to_dict(mcfg)
    try:
        cfg.model_config()
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from e
    validate(cfg)
    from .adapt import check_selectors

    check_selectors(cfg)  # train.freeze / train.lr_mult entries must name parameters of this model
    from ..data.wds import check_urls

    check_urls(cfg.data.train, "data.train")
    if cfg.eval.zeroshot.shards:
        check_urls(cfg.eval.zeroshot.shards, "eval.zeroshot.shards")
    if cfg.eval.retrieval.shards:
        check_urls(cfg.eval.retrieval.shards, "eval.retrieval.shards")
    for key in ("classnames", "templates"):
        v = getattr(cfg.eval.zeroshot, key)
        if isinstance(v, str) and not Path(v).is_file():
            raise ConfigError(f"eval.zeroshot.{key}: file {v!r} not found")
    return cfg


__all__ = ["DataConfig", "DistillConfig", "EvalConfig", "RetrievalConfig", "RunConfig", "TrainConfig",
           "ZeroShotConfig", "load_run_config", "parse_value"]
