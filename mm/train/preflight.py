"""Everything about a run that can be checked before any work: ``load_run_config`` reads a YAML file and
``section.key=value`` overrides into a RunConfig, validates every value, then checks what needs the file system
or the model's names (the architecture resolves, ``train.init_from`` / ``train.resume`` exist, the teacher and
precomputed embeddings fit, ``train.freeze`` / ``train.lr_mult`` select parameters, shards and class-name files
exist, the ``eval.benchmark`` suite's datasets resolve). Every error names its key and is raised here, never mid-run."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from ..config import (
    ConfigError,
    apply_overrides,
    from_dict,
    load_file,
    parse_overrides,
    to_dict,
    validate,
)
from ..data.retrieved import RetrievalPrompts
from ..data.wds import check_urls, read_keys
from ..hub.wrapped import WrappedModelError, native_only
from ..models import naflex_problem
from ..tokenizer import get_tokenizer
from ..utils.precision import emulated_on_cpu
from . import classify
from .adapt import check_lora, check_selectors
from .benchmark import check_suite
from .config import RunConfig, init_from_problem, not_native
from .distill import check_sources
from .feed import views_spec


def load_run_config(path: str | Path | None, overrides: list[str] | dict[str, Any] = ()) -> RunConfig:
    """YAML file (optional) + overrides (``["train.lr=1e-3", ...]`` or a dict) -> validated RunConfig."""
    data = load_file(path) if path else {}
    cfg = from_dict(RunConfig, data)
    items = parse_overrides(overrides)
    # `model=ViT-B-32` replaces the model; `model.vision.patch_size=16` edits an inline mapping
    model_items = {k: v for k, v in items.items() if k.startswith("model.")}
    rest = {k: v for k, v in items.items() if not k.startswith("model.")}
    cfg = apply_overrides(cfg, rest) if rest else cfg
    mcfg = _model_config(cfg)
    if model_items:
        cfg.model = to_dict(apply_overrides(mcfg, {k[len("model."):]: v for k, v in model_items.items()}))
        _model_config(cfg)
    validate(cfg)
    if cfg.train.precision == "auto":  # what this machine computes fastest at (the run's config.yaml records it)
        cfg.train.precision = "bf16" if torch.cuda.is_available() or not emulated_on_cpu("bf16") else "fp32"
    preflight(cfg)
    return cfg


def _model_config(cfg: RunConfig):
    """The run's architecture; errors (a model mm runs only through open_clip among them) name ``model``."""
    try:
        return cfg.model_config()
    except ConfigError as e:
        raise ConfigError(f"model: {e}") from e


def _raise_first(problems, prefix: str) -> None:
    for key, msg in problems:
        raise ConfigError(f"{prefix}{key}: {msg}")


def preflight(cfg: RunConfig) -> None:
    """The checks beyond the values themselves (see the module docstring); ConfigError naming the key."""
    t = cfg.train
    if t.init_from:
        problem = init_from_problem(t.init_from)
        if problem:
            raise ConfigError(f"train.init_from: {problem}")
        reason = not_native(t.init_from)  # open_clip's weights of a model mm does not build fit no mm model
        if reason:
            raise ConfigError(f"train.init_from: {native_only('starting from its weights', reason)}")
    if t.resume not in ("auto", "none") and not Path(t.resume).exists():
        raise ConfigError(f"train.resume: checkpoint {t.resume!r} does not exist (use auto, none or a checkpoint "
                          "path)")
    if cfg.distill is not None:
        _raise_first(check_sources(cfg.distill), "distill.")
    if t.objective is not None:
        from .tasks import load_objective

        load_objective(t.objective)  # importable, callable: before any work
    _raise_first(_model_problems(cfg) if cfg.finetune is None else _finetune_problems(cfg), "")
    check_selectors(cfg)  # train.freeze / train.lr_mult entries must name parameters of this model
    check_lora(cfg)  # train.lora targets must select layers of this model, wide enough for the rank
    check_urls(cfg.data.train, "data.train")
    if cfg.data.keep:
        read_keys(cfg.data.keep, "data.keep")  # exists, UTF-8, lists a key: before any work
    if cfg.eval.zeroshot.shards:
        check_urls(cfg.eval.zeroshot.shards, "eval.zeroshot.shards")
    if cfg.eval.retrieval.shards:
        check_urls(cfg.eval.retrieval.shards, "eval.retrieval.shards")
    for key in ("classnames", "templates"):
        v = getattr(cfg.eval.zeroshot, key)
        if isinstance(v, str) and not Path(v).is_file():
            raise ConfigError(f"eval.zeroshot.{key}: file {v!r} not found")
    if cfg.eval.benchmark:  # the suite's datasets, tasks, class names and shards, as mm benchmark checks them
        check_suite(cfg.eval.benchmark, has_decoder=cfg.model_config().decoder is not None)


def _finetune_problems(cfg: RunConfig):
    """A fine-tuning run (``finetune`` section) takes its model and objective from that section and is scored on its
    test shards: the image-text run's keys for them must stay unset."""
    t, e = cfg.train, cfg.eval
    for key, value in (("model", cfg.model), ("train.init_from", t.init_from), ("train.lora", t.lora),
                       ("train.freeze", t.freeze), ("train.lr_mult", t.lr_mult), ("train.objective", t.objective),
                       ("train.objectives", t.objectives),
                       ("distill", cfg.distill), ("eval.zeroshot.shards", e.zeroshot.shards),
                       ("eval.retrieval.shards", e.retrieval.shards), ("eval.captioning.shards", e.captioning.shards),
                       ("eval.benchmark", e.benchmark)):
        if value:
            yield key, ("does not apply to a fine-tuning run, whose model, adapters and evaluation are the finetune "
                        "section's; leave it unset")
    if t.grad_cache_chunk is not None:
        yield "train.grad_cache_chunk", ("a fine-tuning run's objective couples no samples: gradient caching has "
                                         "nothing to cache (lower data.batch_size, raise train.grad_accum)")
    if t.fsdp:
        yield "train.fsdp", "a fine-tuning run does not shard its model (WiSE-FT mixes whole tensors): use DDP"
    check_urls(cfg.finetune.test, "finetune.test")
    reason = not_native(cfg.finetune.model)  # before loading (or downloading) a model fine-tuning cannot use
    if reason:
        raise WrappedModelError(native_only(classify.WHAT, reason))


def _retrieval_problems(cfg: RunConfig, mcfg):
    r = cfg.data.retrieval
    if mcfg.decoder is None:
        yield "data.retrieval", "retrieval-augmented captioning needs a model with a decoder (e.g. model: tiny-coca)"
        return
    if cfg.train.objectives is not None and cfg.train.objectives.decoder is not None:
        yield "data.retrieval", "the decoder reads either retrieved captions or LocCa's prompted tasks, not both"
    if cfg.eval.captioning.shards:
        yield "eval.captioning.shards", ("would caption without the datastore the model reads; score a retrieval-"
                                         "augmented model with `mm caption` and its datastore")
    if not Path(r.captions).is_file():
        yield "data.retrieval.captions", f"file {r.captions!r} not found (make it with `mm retrieve`)"
    try:  # the template and k captions of at least a token each must fit beside the caption
        RetrievalPrompts(get_tokenizer(SimpleNamespace(config=mcfg)), mcfg.text.context_length, r.k, r.caption_tokens)
    except ValueError as e:
        yield "data.retrieval.k", str(e)


def _model_problems(cfg: RunConfig):
    """What the run asks of its model: a logit bias for SigLIP, a decoder for captioning, room for captions."""
    mcfg = cfg.model_config()
    if cfg.train.loss == "siglip" and mcfg.init_logit_bias is None:
        yield "train.loss", "siglip needs a model with a logit bias (set model.init_logit_bias, e.g. -10)"
    if cfg.eval.captioning.shards and mcfg.decoder is None:
        yield "eval.captioning.shards", "captioning needs a model with a decoder (e.g. model: tiny-coca)"
    if cfg.train.objectives is not None:
        yield from _objectives_problems(cfg, mcfg)
    if cfg.data.naflex is not None:
        yield from _naflex_problems(cfg, mcfg)
    if cfg.data.retrieval is not None:
        yield from _retrieval_problems(cfg, mcfg)
    gen = cfg.eval.captioning.generation
    if gen.max_new_tokens is not None and gen.max_new_tokens >= mcfg.text.context_length:
        yield "eval.captioning.generation.max_new_tokens", (
            f"{gen.max_new_tokens} does not fit the model's context length {mcfg.text.context_length} "
            "(start token included)")


def _objectives_problems(cfg: RunConfig, mcfg):
    """``train.objectives`` against the model and the run: each objective needs a part of the model it can run."""
    o, key = cfg.train.objectives, "train.objectives"
    if o.decoder is not None:
        if mcfg.decoder is None:
            yield f"{key}.decoder", "LocCa's tasks need a model with a decoder (model.decoder; e.g. model: tiny-siglip2)"
        elif (o.decoder.referring or o.decoder.grounded) and not mcfg.decoder.loc_bins:
            yield f"{key}.decoder.referring", ("referring and grounded tasks write boxes as box tokens, which the "
                                               "model's decoder has none of (model.decoder.loc_bins); set them to 0 "
                                               "or use a model with box tokens (e.g. tiny-siglip2)")
    for name in ("self_distill", "masked"):
        if getattr(o, name) is None:
            continue
        if mcfg.one_tower is not None:
            yield f"{key}.{name}", "needs a model with an image tower of its own (the EMA teacher copies it), not a "\
                                   "one-tower model"
        if cfg.train.fsdp:
            yield "train.fsdp", f"{key}.{name}'s EMA teacher copies the whole image tower, which a sharded model "\
                                "does not hold; train it with DDP"
    if o.masked is not None and mcfg.vision.pool == "attn":
        yield f"{key}.masked", ("predicts the teacher's patch features: the model's image tower hands on pooled "
                                "queries (vision.pool: attn) instead of patches; use cls, mean or map pooling")
    if cfg.data.decode == "device":
        yield "data.decode", f"{key} reads local crops, patch masks or regions the data workers make: use workers"



def _naflex_problems(cfg: RunConfig, mcfg):
    """``data.naflex`` needs an image tower that takes patch sequences (mm/models/vision.py ``embed_patches``)."""
    problem = naflex_problem(mcfg.vision)
    if mcfg.one_tower is not None:
        yield "data.naflex", "a one-tower model embeds square images only; NaFlex needs a model with its own image tower"
    elif problem:
        yield "data.naflex", f"the model's image tower takes square images only: {problem}"
    if cfg.distill is not None and cfg.distill.image_embeddings is None:
        yield "distill.teacher", ("a live teacher reads the student's square images; with data.naflex give the "
                                  "teacher's image embeddings instead (distill.image_embeddings: mm embed output)")
    if views_spec(cfg, mcfg) is not None:
        yield "data.naflex", ("train.objectives' local crops, patch masks and regions are cut from square images; "
                              "train those objectives without data.naflex")
