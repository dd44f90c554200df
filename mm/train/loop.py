"""The training run under Accelerate: one CPU, one GPU, many GPUs or nodes.

``main`` reads top to bottom: config -> accelerator -> model -> optimizer -> data -> resume -> steps ->
final save and evaluation. Each stage is a function a test can call.
"""
from __future__ import annotations

import hashlib
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..data.decode import SampleDecoder
from ..dist import average_gradients
from ..data.gpu import DeferredTrainTransform, GpuImageDecoder, PendingImages
from ..data.transforms import image_transform
from ..data.wds import Collate, ShardStream, check_urls, make_loader
from ..layers import RouterStats
from ..losses import CocaLoss, make_loss
from ..models.clip import CLIP, model_class
from ..pretrained import save_pretrained
from ..tokenizer import get_tokenizer
from . import adapt
from . import checkpoint as ckpt
from . import fsdp as sharding
from .config import RunConfig, load_run_config
from .distill import build_distiller
from .evaluate import evaluate
from .log import RunLogger, plot_run
from .optim import grad_norm, make_optimizer, make_scheduler


class TrainingError(RuntimeError):
    """The run cannot continue (e.g. too many non-finite steps in a row)."""


@dataclass
class DataState:
    """What this process has consumed: batches, each worker's stream position, skipped samples."""

    batches: int = 0
    workers: dict[int, tuple[int, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def consume(self, meta: dict[str, Any]) -> None:
        self.batches += 1
        self.workers[meta["worker"]] = (meta["epoch"], meta["pos"])
        for reason, n in meta["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + n

    def to_json(self, workers_per_process: int) -> dict[str, Any]:
        return {"batches": self.batches, "workers_per_process": workers_per_process,
                "positions": {str(k): list(v) for k, v in self.workers.items()}, "skipped": self.skipped}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DataState:
        return cls(d["batches"], {int(k): tuple(v) for k, v in d["positions"].items()}, dict(d["skipped"]))


class StopFlag:
    """SIGTERM / SIGINT ask for a checkpoint at the next step boundary (cluster preemption)."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))  # a second signal acts as usual

    def uninstall(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def make_accelerator(cfg: RunConfig):
    from accelerate import Accelerator

    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.train.precision]
    # cpu=True is what makes `accelerate launch --multi_gpu` on a GPU-less machine form gloo ranks
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mp)
    from accelerate.utils import DistributedType

    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # accelerate's FSDP would wrap the model its own way (mm shards it itself: train.fsdp, mm/train/fsdp.py
        # says why); DeepSpeed's engine would own the optimizer, precision and checkpoints the loop manages
        raise ValueError(f"accelerate config uses {acc.distributed_type.value}, which mm's trainer does not take "
                         "from accelerate; launch with a multi-GPU (DDP) config and set train.fsdp=true to shard "
                         "the model (mm applies FSDP2 itself), see docs/distributed.md")
    return acc


def build_model(cfg: RunConfig) -> CLIP:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every process
    mcfg = cfg.model_config()
    model = model_class(mcfg)(mcfg)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_train_stream(cfg: RunConfig, model: CLIP, rank: int, world: int, data: DataState) -> ShardStream:
    mcfg = model.config
    transform = image_transform(mcfg, train=True, scale=tuple(cfg.data.crop_scale))
    on_device = cfg.data.decode == "device"
    if on_device:
        transform = DeferredTrainTransform(transform, cfg.data.max_pixels)
    decoder = SampleDecoder(transform, image_keys=cfg.data.image_keys, text_key=cfg.data.text_key,
                            need=("text",), max_pixels=cfg.data.max_pixels,
                            random_caption=cfg.data.random_caption, raw_image=on_device)
    nw = max(1, cfg.data.workers)
    return ShardStream(check_urls(cfg.data.train, "data.train"), decoder, Collate(get_tokenizer(model)),
                       cfg.data.batch_size, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                       train=True, resampled=cfg.data.resampled, rank=rank, world=world,
                       start=data.workers, rotation=data.batches % nw)


def build_loss(cfg: RunConfig, model: CLIP) -> torch.nn.Module:
    """The configured contrastive loss; wrapped in the CoCa loss when the model has a decoder."""
    t = cfg.train
    loss_kw = {"local_loss": t.local_loss} if t.loss == "clip" else {}
    loss = make_loss(t.loss, aux_weight=t.aux_weight, **loss_kw)
    if model.config.decoder is not None:
        loss = CocaLoss(loss, contrastive_weight=t.contrastive_weight, caption_weight=t.caption_weight,
                        label_smoothing=t.label_smoothing, aux_weight=t.aux_weight)
    return loss


def routing_metrics(stats: dict[str, list[RouterStats]], layers: dict[str, list[int]]) -> dict[str, Any]:
    """``moe/<tower or modality>/<block>/load|dropped|entropy``: each MoE layer's fraction of assignments per
    expert (before capacity), fraction of assignments dropped over capacity and mean per-token router
    entropy (nats), in this process's last micro-batch. One device-to-host copy for all of them."""
    keys, rows = [], []
    for tower, per_layer in stats.items():
        for block, s in zip(layers[tower], per_layer):
            keys.append(f"moe/{tower}/{block}")
            rows.append(torch.cat([s.load, s.dropped_fraction[None], s.entropy[None]]).float())
    if not rows:
        return {}
    values, rec, start = torch.cat(rows).cpu().tolist(), {}, 0
    for key, row in zip(keys, rows):
        v, start = values[start : start + len(row)], start + len(row)
        rec[f"{key}/load"] = [round(x, 5) for x in v[:-2]]
        rec[f"{key}/dropped"], rec[f"{key}/entropy"] = v[-2], v[-1]
    return rec


def find_resume(cfg: RunConfig) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        found = ckpt.complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
        return found[-1] if found else None
    return Path(cfg.train.resume)


def params_sha256(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train according to ``cfg``; returns the final evaluation (empty if none configured)."""
    acc = make_accelerator(cfg)
    out_dir, ckpt_root = Path(cfg.output_dir), Path(cfg.output_dir) / "checkpoints"
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        import yaml

        (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    acc.wait_for_everyone()

    core = build_model(cfg)
    frozen, lr_scales = adapt.prepare(core, cfg)  # train.init_from weights, train.freeze, lr_mult / layer_decay
    adapt.set_train_mode(core, frozen)  # frozen modules in eval mode for the whole run (evaluation restores modes)
    sharded, replicated, eval_copy = cfg.train.fsdp and world > 1, [], None  # one process: nothing to shard
    if sharded:  # before the optimizer exists: it must hold the sharded parameters
        core.to(acc.device)
        replicated = sharding.shard_model(core)
        eval_copy = sharding.EvalCopy(core, acc.device)
    opt = make_optimizer(core, cfg.train.lr, cfg.train.weight_decay, tuple(cfg.train.betas), cfg.train.eps, acc.device,
                         lr_scales)
    # distill: a frozen teacher around the usual loss; a learned projection joins opt before the scheduler reads it
    loss_fn = build_loss(cfg, core)
    distill = build_distiller(cfg, core, loss_fn, opt, acc.device, acc.autocast)  # the run's loss is its task loss
    trained = [*core.parameters(), *(distill.parameters() if distill is not None else [])]
    sched = make_scheduler(opt, cfg.train.warmup_steps, cfg.train.steps, cfg.train.lr, cfg.train.min_lr)
    step, skipped_steps, data = 0, 0, DataState()
    resume_from = find_resume(cfg)
    if resume_from is not None:
        state = ckpt.load(resume_from, rank)
        if bool(state["state"].get("fsdp", False)) != sharded:
            raise TrainingError(f"{resume_from} was written {'without' if sharded else 'with'} a sharded model "
                                f"(train.fsdp={not sharded} over several processes); resume it the same way (the "
                                "optimizer state is stored differently)")
        if sharded:
            sharding.load_full_state(core, opt, state["model"], state["optimizer"])
        else:
            core.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        if distill is not None:
            distill.load(resume_from)
        sched.load_state_dict(state["scheduler"])
        step, skipped_steps = state["state"]["step"], state["state"]["skipped_steps"]
        if state["data"] and state["data"]["workers_per_process"] == max(1, cfg.data.workers) \
                and state["state"]["world_size"] == world:
            data = DataState.from_json(state["data"])
        else:
            acc.print(f"warning: resuming with a different number of processes x workers than {resume_from} "
                      "was written with; the data stream restarts its shuffle order (not bit-exact)")
            data.batches = state["state"].get("batches", 0)
    if sharded:  # FSDP already synchronises the gradients: accelerate must not wrap the model in DDP
        model, opt = core, acc.prepare(opt)
    else:
        model = torch.compile(core) if cfg.train.compile else core
        model, opt = acc.prepare(model, opt)
    if resume_from is not None and acc.scaler is not None and "scaler" in state["state"]:
        acc.scaler.load_state_dict(state["state"]["scaler"])

    loader = make_loader(build_train_stream(cfg, core, rank, world, data), cfg.data.workers,
                         cfg.data.prefetch_factor, pin_memory=acc.device.type == "cuda")
    v = core.config.vision
    gpu_decoder = GpuImageDecoder(v.image_size, v.image_mean, v.image_std) if cfg.data.decode == "device" else None
    end = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
    log = RunLogger(out_dir, cfg.train.steps, step, enabled=main)
    skip_log = open(out_dir / f"skipped_samples.rank{rank}.txt", "a", buffering=1)
    if resume_from is not None:
        log.info(f"resumed from {resume_from} at step {step}")
    n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
    log.info(f"training {cfg.model if isinstance(cfg.model, str) else 'model'}"
             f"{f' from {cfg.train.init_from}' if cfg.train.init_from else ''}: "
             f"{sum(p.numel() for p in core.parameters()):,} parameters ({n_train:,} trained"
             f"{f', frozen: {cfg.train.freeze}' if frozen else ''}), {world} process(es){' (FSDP)' if sharded else ''} "
             f"on {acc.device}, "
             f"batch {cfg.data.batch_size} x {world} x accum {cfg.train.grad_accum}, steps {step} -> {end}")
    if distill is not None:
        log.info(distill.describe())
    if step == 0:
        log.log({"step": 0, "world_size": world, "device": str(acc.device)}, show=False)

    def save(at: int) -> None:
        optimizer = opt.optimizer if hasattr(opt, "optimizer") else opt
        gathered = {}
        if sharded:  # collective: every process takes part, the main one receives the whole state
            gathered = {"model_state": sharding.full_state_dict(core),
                        "optimizer_state": sharding.full_optimizer_state(core, optimizer)}
        if main:
            extra = {"scaler": acc.scaler.state_dict()} if acc.scaler is not None else {}
            ckpt.save_main(ckpt_root, at, core, optimizer, sched,
                           {"step": at, "skipped_steps": skipped_steps, "world_size": world, "fsdp": sharded,
                            "batches": data.batches, **extra}, **gathered)
            if distill is not None:
                distill.save(ckpt.tmp_dir(ckpt_root, at))
        acc.wait_for_everyone()
        ckpt.save_rank(ckpt_root, at, rank, data.to_json(max(1, cfg.data.workers)))
        acc.wait_for_everyone()
        if main:
            ckpt.publish(ckpt_root, at, cfg.train.keep_checkpoints)
        acc.wait_for_everyone()

    stop = StopFlag()
    stop.install()
    batches = iter(loader)  # draws the workers' base seed from the global RNG: before restoring it
    torch.manual_seed(cfg.train.seed * 1000 + rank + step)  # dropout / patch dropout streams per rank
    if resume_from is not None and state["rng"] is not None:
        ckpt.set_rng_state(state["rng"])
    bad_in_row, t_last, samples_since = 0, time.time(), 0
    results: dict[str, Any] = {}
    max_bad = cfg.train.max_bad_steps + (16 if cfg.train.precision == "fp16" else 0)  # fp16: scaler calibration
    try:
        while step < end:
            if _agree(acc, stop.requested):
                save(step)
                log.info(f"stopped by signal at step {step}; checkpoint written. Run again with train.resume=auto "
                         "to continue.")
                return results
            losses = None
            for micro in range(cfg.train.grad_accum):
                batch = next(batches)
                data.consume(batch["meta"])
                _report_bad(batch["meta"], skip_log, log, rank)
                images = batch["images"]
                if isinstance(images, PendingImages):
                    images = gpu_decoder(images, acc.device)
                else:
                    images = images.to(acc.device, non_blocking=True)
                tokens = batch["tokens"].to(acc.device, non_blocking=True)
                sync = nullcontext() if micro == cfg.train.grad_accum - 1 else acc.no_sync(model)
                with sync:
                    with acc.autocast() if sharded else nullcontext():  # prepare() adds it to unsharded models
                        out = model(images, tokens)
                    losses = loss_fn(out) if distill is None else distill(out, batch, images, tokens)
                    acc.backward(losses["loss"] / cfg.train.grad_accum)
                samples_since += images.shape[0] * world
            if distill is not None:
                distill.sync_grads()
            if sharded:
                average_gradients(replicated)  # the scalars FSDP2 cannot shard
            if cfg.train.grad_clip:
                norm = acc.clip_grad_norm_(trained, cfg.train.grad_clip)
            else:
                acc.unscale_gradients()  # fp16: the finite check needs the true gradients
                norm = grad_norm(trained)
            finite = bool(torch.isfinite(sharding.plain(norm)))  # one host sync per step: the skip decision needs it
            if finite or cfg.train.precision == "fp16":
                opt.step()  # under fp16 the grad scaler skips overflowing steps itself
            opt.zero_grad(set_to_none=True)
            sched.step()
            if core.logit_scale.requires_grad:  # a frozen scale stays bit-identical
                with torch.no_grad():
                    core.logit_scale.clamp_(0, math.log(100))  # CLIP: temperature capped at 100
            step += 1
            log.advance()
            if finite:
                bad_in_row = 0
            else:
                skipped_steps += 1
                bad_in_row += 1
                log.info(f"step {step}: non-finite loss or gradients; step skipped ({bad_in_row} in a row)")
                if bad_in_row >= max_bad:
                    raise TrainingError(f"{bad_in_row} steps in a row had non-finite loss or gradients "
                                        f"(last at step {step}); lower train.lr or check the data")
            if step % cfg.train.log_every == 0 or step == end:
                dt = time.time() - t_last
                # the base rate: group 0 may be scaled (train.lr_mult / layer_decay)
                lr_now = sched.get_last_lr()[0] / opt.param_groups[0].get("lr_scale", 1.0)
                rec = {"step": step, "loss": losses["loss"].item(), "lr": lr_now,
                       "samples_per_s": samples_since / max(dt, 1e-9), "skipped_samples": sum(data.skipped.values()),
                       "skipped_steps": skipped_steps, "logit_scale": core.logit_scale.exp().item(),
                       "eta_s": (end - step) * dt / cfg.train.log_every}
                for k in ("contrastive_loss", "caption_loss", "aux_loss", "task_loss", "kl_loss", "feature_loss"):
                    if k in losses and k != "loss":
                        rec[k] = losses[k].item()
                log.log(rec)
                if main and out.router_stats:  # own record: per-layer lists would crowd the console line
                    log.log({"step": step, **routing_metrics(out.router_stats, core.moe_layers())}, show=False)
                t_last, samples_since = time.time(), 0
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < end:
                save(step)
            if cfg.eval.every and step % cfg.eval.every == 0 and step < end:
                results = _evaluate(cfg, core, acc, log, step, eval_copy)
        save(step)
        if step >= cfg.train.steps:
            results = _finish(cfg, core, acc, log, step, data, distill, eval_copy)
        else:
            log.info(f"stopped after step {step} (train.stop_after); resume with train.resume=auto")
        return results
    finally:
        stop.uninstall()
        log.close()
        skip_log.close()


def _agree(acc, flag: bool) -> bool:
    """True if any process was asked to stop (the signal may reach only some of them)."""
    if acc.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
    return bool(acc.reduce(t, reduction="sum").item() > 0)


def _report_bad(meta: dict[str, Any], skip_log, log: RunLogger, rank: int) -> None:
    for line in meta["bad"]:
        skip_log.write(line + "\n")
        log.info(f"skipped sample {line}") if rank == 0 else print(f"[rank {rank}] skipped sample {line}")
    for w in meta["warnings"]:
        log.info(f"warning: {w}") if rank == 0 else print(f"[rank {rank}] warning: {w}")


def _evaluate(cfg: RunConfig, core: CLIP, acc, log: RunLogger, step: int,
              eval_copy: sharding.EvalCopy | None = None, gathered: bool = False,
              whole: CLIP | None = None) -> dict[str, Any]:
    """Evaluation on the main process while the others wait. A sharded model (``eval_copy``) is first gathered
    into an unsharded copy, a collective step every process takes; ``gathered``: the caller already did
    (``whole``: the copy on the main process, None on the others)."""
    results: dict[str, Any] = {}
    if not (cfg.eval.zeroshot.shards or cfg.eval.retrieval.shards or cfg.eval.captioning.shards):
        return results
    if eval_copy is not None and not gathered:
        whole = eval_copy.refresh(acc.is_main_process)
    if acc.is_main_process:
        results = evaluate(cfg, whole if whole is not None else core, acc.device)
        for ex in results.pop("caption_examples", []):
            log.info(f"caption {ex['key']}: {ex['caption']!r}   (reference: {ex['references'][0]!r})")
        if results:
            log.log({"step": step, **results})
    acc.wait_for_everyone()
    return results


def _finish(cfg: RunConfig, core: CLIP, acc, log: RunLogger, step: int, data: DataState,
            distill=None, eval_copy: sharding.EvalCopy | None = None) -> dict[str, Any]:
    from accelerate.utils import gather_object

    whole = None
    if eval_copy is not None:  # sharded: the main process holds the one whole copy, so one hash
        whole = eval_copy.refresh(acc.is_main_process)
        shas = {"param_sha256": [params_sha256(whole)] if acc.is_main_process else []}
    else:
        shas = {"param_sha256": gather_object([params_sha256(core)])}
    proj = distill.loss.proj if distill is not None else None
    if proj is not None:  # trained outside DDP: its gradient sync is ours to get right
        shas["distill_sha256"] = gather_object([params_sha256(proj)])
    results = _evaluate(cfg, core, acc, log, step, eval_copy, gathered=True, whole=whole)
    if acc.is_main_process:
        for what, values in shas.items():
            if len(set(values)) != 1:
                log.info(f"WARNING: {what}: parameters differ between processes: {values}")
        save_pretrained(whole if whole is not None else core, Path(cfg.output_dir) / "final")
        log.log({"step": step, "final": True, **shas, "skipped_by_reason": data.skipped}, show=False)
        plots = plot_run(cfg.output_dir)
        log.info(f"final model: {Path(cfg.output_dir) / 'final'}; plots: {', '.join(p.name for p in plots)}")
        if data.skipped:
            log.info(f"skipped samples by reason: {data.skipped} (names in skipped_samples.rank*.txt)")
    acc.wait_for_everyone()
    return results


def main(config: str | None, overrides: list[str] = ()) -> int:
    from ..host import tune_malloc

    cfg = load_run_config(config, list(overrides))  # every config error surfaces here, before any work
    tune_malloc()  # train.py / mm train own their process (mm/host.py)
    results = run(cfg)
    if results:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
        print(f"evaluation: {summary}")
    return 0
