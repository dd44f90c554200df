"""The training run: one CPU, one GPU, many GPUs or nodes (``accelerate launch``).

``run(cfg)`` reads as what a run does: set up (processes, model, optimizer, loss: :class:`Trainer`'s
constructor), ``resume`` from the newest checkpoint, ``train`` (the step loop with its periodic logs,
checkpoints and evaluations), ``finish`` (final evaluation, ``final/``, plots). Each stage is a method a test
can call; the numerics of one optimizer step are :class:`mm.train.step.Stepper`'s, shared with ``mm finetune``.
"""
from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..data.decode import SampleDecoder
from ..data.gpu import DeferredTrainTransform, GpuImageDecoder, PendingImages
from ..data.transforms import image_transform
from ..data.wds import Collate, ShardStream, check_urls, make_loader
from ..eval import evaluate
from ..layers import RouterStats
from ..models import ImageTextModel, ModelOutput, model_class
from ..tokenizer import get_tokenizer
from ..utils import dist
from ..utils.host import tune_malloc
from ..utils.nn import params_sha256
from ..utils.precision import autocast
from . import adapt
from . import checkpoint as ckpt
from . import fsdp as sharding
from .benchmark import TrainingBenchmark
from .fsdp import plain
from .config import RunConfig
from .executors import make_executor
from .log import RunLogger, plot_run
from .optim import make_optimizer, make_scheduler
from .preflight import load_run_config
from .state import AdapterState, PlainState, ShardedState
from .step import Stepper, TrainingError
from .tasks import build_task

__all__ = ["DataState", "StopFlag", "Trainer", "TrainingError", "build_model", "main", "run"]


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
    """accelerate's view of the launch: it forms the process group and wraps the model in DDP. Precision is not
    its business here (``Stepper`` owns autocast and the fp16 scaler, for the trainer and finetuning alike)."""
    from accelerate import Accelerator

    if cfg.train.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("train.precision: fp16 needs a CUDA device; use bf16 or fp32 on CPU")
    acc = Accelerator(cpu=dist.use_cpu(), mixed_precision="no")
    from accelerate.utils import DistributedType

    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # accelerate's FSDP would wrap the model its own way (mm shards it itself: train.fsdp, mm/train/fsdp.py
        # says why); DeepSpeed's engine would own the optimizer, precision and checkpoints the loop manages
        raise ValueError(f"accelerate config uses {acc.distributed_type.value}, which mm's trainer does not take "
                         "from accelerate; launch with a multi-GPU (DDP) config and set train.fsdp=true to shard "
                         "the model (mm applies FSDP2 itself), see docs/distributed.md")
    return acc


def build_model(cfg: RunConfig) -> ImageTextModel:
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every process
    mcfg = cfg.model_config()
    model = model_class(mcfg)(mcfg)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def build_train_stream(cfg: RunConfig, model: ImageTextModel, rank: int, world: int, data: DataState) -> ShardStream:
    mcfg = model.config
    transform = image_transform(mcfg, train=True, scale=tuple(cfg.data.crop_scale))
    on_device = cfg.data.decode == "device"
    if on_device:
        transform = DeferredTrainTransform(transform, cfg.data.max_pixels)
    decoder = SampleDecoder(transform, image_keys=cfg.data.image_keys, text_key=cfg.data.text_key,
                            need=("text",), max_pixels=cfg.data.max_pixels,
                            random_caption=cfg.data.random_caption, raw_image=on_device)
    nw = max(1, cfg.data.workers)
    tok = get_tokenizer(model)
    if callable(getattr(tok, "load", None)):
        tok.load()  # a Hugging Face tokenizer that cannot load: one line here, not a traceback from each worker
    return ShardStream(check_urls(cfg.data.train, "data.train"), decoder, Collate(tok),
                       cfg.data.batch_size, seed=cfg.train.seed, shuffle_buffer=cfg.data.shuffle_buffer,
                       train=True, resampled=cfg.data.resampled, rank=rank, world=world,
                       start=data.workers, rotation=data.batches % nw)


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


def lora_base(cfg: RunConfig) -> str | None:
    """What a LoRA run's adapter names as its base: ``train.init_from`` (a directory made absolute, so the adapter
    finds it from anywhere), else the model preset or config (random weights: None)."""
    spec = cfg.train.init_from
    if spec is None:
        return None
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


def find_resume(cfg: RunConfig) -> Path | None:
    if cfg.train.resume == "none":
        return None
    if cfg.train.resume == "auto":
        found = ckpt.complete_checkpoints(Path(cfg.output_dir) / "checkpoints")
        return found[-1] if found else None
    return Path(cfg.train.resume)


class Trainer:
    """One training run. The constructor sets it up (process group, output directory, model with
    ``train.init_from`` / ``train.freeze`` / FSDP applied, optimizer, loss, distiller, scheduler); then
    :meth:`resume`, :meth:`train`."""

    def __init__(self, cfg: RunConfig):
        self.cfg, t = cfg, cfg.train
        self.acc = make_accelerator(cfg)
        self.device = self.acc.device
        self.rank, self.world, self.main = dist.rank(), dist.world_size(), dist.is_main()
        self.out_dir = Path(cfg.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        if self.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        dist.barrier()
        self.core = build_model(cfg)
        # train.init_from weights, train.freeze, lr_mult / layer_decay; frozen modules stay in eval mode for the
        # whole run (evaluation restores every module's mode)
        self.frozen, lr_scales = adapt.prepare(self.core, cfg)
        adapt.set_train_mode(self.core, self.frozen)
        sharded, replicated = t.fsdp and self.world > 1, []  # one process: nothing to shard
        if sharded:  # before the optimizer exists: it must hold the sharded parameters
            self.core.to(self.device)
            replicated = sharding.shard_model(self.core)
        self.opt = make_optimizer(self.core, t.lr, t.weight_decay, tuple(t.betas), t.eps, self.device, lr_scales)
        # how the run's state is saved, resumed and finished: sharded, adapters only, or plain
        if sharded:
            self.state = ShardedState(self.core, self.opt, sharding.EvalCopy(self.core, self.device), replicated)
        elif t.lora is not None:
            self.state = AdapterState(self.core, self.opt, t.lora, lora_base(cfg))
        else:
            self.state = PlainState(self.core, self.opt)
        # the objective; what it trains itself (distillation's projection) joins the optimizer before the
        # scheduler reads its groups
        self.task = build_task(cfg, self.core, self.opt, self.device, partial(autocast, self.device, t.precision))
        trained = [*self.core.parameters(), *self.task.parameters()]
        self.log: RunLogger | None = None
        self.stepper = Stepper(self.opt, trained, device=self.device, precision=t.precision, grad_clip=t.grad_clip,
                               max_bad_steps=t.max_bad_steps, log=self._info)
        self.sched = make_scheduler(self.opt, t.warmup_steps, t.steps, t.lr, t.min_lr)
        self.step, self.data = 0, DataState()
        self.resumed_from: Path | None = None
        self.rng_state = None
        self.results: dict[str, Any] = {}
        # eval.benchmark: an mm benchmark suite scored at each evaluation, by every process
        self.benchmark = None if not cfg.eval.benchmark else TrainingBenchmark(
            cfg.eval.benchmark, cfg.output_dir, batch_size=cfg.eval.batch_size, workers=cfg.data.workers,
            precision=t.precision, log=self._info)

    def _info(self, msg: str) -> None:
        if self.log is not None:
            self.log.info(msg)

    # -- resume --------------------------------------------------------------------------------------------
    def resume(self, path: Path | None = None) -> None:
        """Continue from ``path`` (default: ``train.resume``'s choice, e.g. the newest complete checkpoint):
        weights, optimizer, scheduler, scaler, step counters, this process's data position and RNG states."""
        path = path if path is not None else find_resume(self.cfg)
        if path is None:
            return
        state = ckpt.load(path, self.rank)
        if bool(state["state"].get("fsdp", False)) != self.state.sharded:
            raise TrainingError(f"{path} was written {'without' if self.state.sharded else 'with'} a sharded model "
                                f"(train.fsdp={not self.state.sharded} over several processes); resume it the same "
                                "way (the optimizer state is stored differently)")
        self.state.load(state, path)
        self.task.load(path)
        self.sched.load_state_dict(state["scheduler"])
        self.stepper.load_state_dict(state["state"])
        self.step = state["state"]["step"]
        if state["data"] and state["data"]["workers_per_process"] == max(1, self.cfg.data.workers) \
                and state["state"]["world_size"] == self.world:
            self.data = DataState.from_json(state["data"])
        else:
            if self.main:
                print(f"warning: resuming with a different number of processes x workers than {path} was "
                      "written with; the data stream restarts its shuffle order (not bit-exact)")
            self.data.batches = state["state"].get("batches", 0)
        self.resumed_from, self.rng_state = path, state["rng"]

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Steps until ``train.steps`` (or ``train.stop_after``, or a stop signal: then a checkpoint and an
        early return); then the final checkpoint and, at the last step, :meth:`finish`. Returns the last
        evaluation's results."""
        cfg = self.cfg
        end = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
        self._open_logs(end)
        stop = StopFlag()
        stop.install()  # before the data workers start: they inherit it, so a signal to the group spares them
        try:
            batches = self._start()
            while self.step < end:
                if dist.any_process(stop.requested, self.device):  # the signal may reach only some processes
                    self.save(self.step)
                    self.log.info(f"stopped by signal at step {self.step}; checkpoint written. Run again with "
                                  "train.resume=auto to continue.")
                    return self.results
                losses, out = self.train_step(batches)
                self._periodic(end, losses, out)
            self.save(self.step)
            if self.step >= cfg.train.steps:
                return self.finish()
            self.log.info(f"stopped after step {self.step} (train.stop_after); resume with train.resume=auto")
            return self.results
        finally:
            stop.uninstall()
            self.log.close()
            self.skip_log.close()

    def _open_logs(self, end: int) -> None:
        self.log = RunLogger(self.out_dir, self.cfg.train.steps, self.step, enabled=self.main)
        self.skip_log = open(self.out_dir / f"skipped_samples.rank{self.rank}.txt", "a", buffering=1)  # noqa: SIM115 (open for the run; train() closes it)
        self._describe(end)

    def _start(self):
        """Wrap the model for the processes and open the data stream; returns the batch iterator."""
        cfg = self.cfg
        if self.state.sharded:  # FSDP already synchronises the gradients: no DDP wrapper
            self.model = self.core
        else:
            self.model = self.acc.prepare(torch.compile(self.core) if cfg.train.compile else self.core)
        self.executor = make_executor(self.model, self.core, self.task, chunk=cfg.train.grad_cache_chunk,
                                      device=self.device, autocast=self.stepper.autocast, scale=self.stepper.scale,
                                      backward=self.stepper.backward, no_sync=partial(self.acc.no_sync, self.model))
        loader = make_loader(build_train_stream(cfg, self.core, self.rank, self.world, self.data), cfg.data.workers,
                             cfg.data.prefetch_factor, pin_memory=self.device.type == "cuda")
        v = self.core.config.vision
        self.gpu_decoder = GpuImageDecoder(v.image_size, v.image_mean, v.image_std) \
            if cfg.data.decode == "device" else None
        batches = iter(loader)  # draws the workers' base seed from the global RNG: before restoring it
        torch.manual_seed(cfg.train.seed * 1000 + self.rank + self.step)  # dropout / patch dropout streams per rank
        if self.rng_state is not None:
            ckpt.set_rng_state(self.rng_state)
        self.t_last, self.samples_since = time.time(), 0
        return batches

    def _describe(self, end: int) -> None:
        cfg, core = self.cfg, self.core
        if self.resumed_from is not None:
            self.log.info(f"resumed from {self.resumed_from} at step {self.step}")
        n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
        self.log.info(
            f"training {cfg.model if isinstance(cfg.model, str) else 'model'}"
            f"{f' from {cfg.train.init_from}' if cfg.train.init_from else ''}: "
            f"{sum(p.numel() for p in core.parameters()):,} parameters ({n_train:,} trained"
            f"{f', frozen: {cfg.train.freeze}' if self.frozen and cfg.train.freeze else ''}"
            f"{f', LoRA rank {cfg.train.lora.rank} on {cfg.train.lora.targets}' if cfg.train.lora else ''}), "
            f"{self.world} process(es)"
            f"{' (FSDP)' if self.state.sharded else ''} on {self.device}, "
            f"batch {cfg.data.batch_size} x {self.world} x accum {cfg.train.grad_accum}, steps {self.step} -> {end}"
            f"{f', gradient caching in chunks of {cfg.train.grad_cache_chunk}' if cfg.train.grad_cache_chunk else ''}")
        if self.task.describe():
            self.log.info(self.task.describe())
        if self.step == 0:
            self.log.log({"step": 0, "world_size": self.world, "device": str(self.device)}, show=False)

    def train_step(self, batches) -> tuple[dict[str, torch.Tensor], ModelOutput]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns the last micro-batch's losses
        and model output."""
        accum = self.cfg.train.grad_accum
        losses = out = None
        for micro in range(accum):
            batch = next(batches)
            self.data.consume(batch["meta"])
            self._report_bad(batch["meta"])
            images = batch["images"]
            if isinstance(images, PendingImages):
                images = self.gpu_decoder(images, self.device)
            else:
                images = images.to(self.device, non_blocking=True)
            tokens = batch["tokens"].to(self.device, non_blocking=True)
            work = {"images": images, "tokens": tokens, "keys": batch["keys"], "texts": batch["texts"]}
            losses, out = self.executor.step(work, divide=accum, sync=micro == accum - 1)
            self.samples_since += images.shape[0] * self.world
        self.task.sync_grads()  # what the task trains itself is outside DDP
        self.state.sync_grads()
        self.stepper.step(self.step + 1)
        self.sched.step()
        if self.core.logit_scale.requires_grad:  # a frozen scale stays bit-identical
            with torch.no_grad():
                self.core.logit_scale.clamp_(0, math.log(100))  # CLIP: temperature capped at 100
        self.step += 1
        self.log.advance()
        return losses, out

    def _periodic(self, end: int, losses: dict[str, torch.Tensor], out: ModelOutput) -> None:
        """What happens every ``train.log_every`` / ``checkpoint_every`` / ``eval.every`` steps."""
        cfg, step = self.cfg, self.step
        if step % cfg.train.log_every == 0 or step == end:
            self._log_step(end, losses, out)
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < end:
            self.save(step)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < end:
            self.results = self.evaluate(periodic=True)

    def _log_step(self, end: int, losses: dict[str, torch.Tensor], out: ModelOutput) -> None:
        dt = time.time() - self.t_last
        # the base rate: group 0 may be scaled (train.lr_mult / layer_decay)
        lr_now = self.sched.get_last_lr()[0] / self.opt.param_groups[0].get("lr_scale", 1.0)
        rec = {"step": self.step, "loss": losses["loss"].item(), "lr": lr_now,
               "samples_per_s": self.samples_since / max(dt, 1e-9), "skipped_samples": sum(self.data.skipped.values()),
               "skipped_steps": self.stepper.skipped, "logit_scale": self.core.logit_scale.exp().item(),
               "grad_norm": float(plain(self.stepper.norm)) if self.stepper.norm is not None else None,
               "eta_s": (end - self.step) * dt / self.cfg.train.log_every}
        rec.update({k: v.item() for k, v in losses.items() if k != "loss"})  # the task's terms
        rec.update(self.executor.log_record(dt))  # gradient caching: its chunks, each pass's share of the time
        self.log.log(rec)
        if self.main and out.router_stats:  # own record: per-layer lists would crowd the console line
            self.log.log({"step": self.step, **routing_metrics(out.router_stats, self.core.moe_layers())}, show=False)
        self.t_last, self.samples_since = time.time(), 0

    def _report_bad(self, meta: dict[str, Any]) -> None:
        for line in meta["bad"]:
            self.skip_log.write(line + "\n")
            self._note(f"skipped sample {line}")
        for w in meta["warnings"]:
            self._note(f"warning: {w}")

    def _note(self, msg: str) -> None:
        self.log.info(msg) if self.rank == 0 else print(f"[rank {self.rank}] {msg}")

    # -- checkpoints, evaluation, the end --------------------------------------------------------------------
    def save(self, at: int) -> None:
        """Checkpoint ``step_{at}``: written under a temporary name by every process, then published."""
        gathered = self.state.gather()  # collective where sharded: every process takes part
        if self.main:
            ckpt.save_main(self.ckpt_root, at, self.core, self.opt, self.sched,
                           {"step": at, "world_size": self.world,
                            "fsdp": self.state.sharded, "batches": self.data.batches, **self.stepper.state_dict(),
                            **self.state.record()},
                           **gathered)
            self.task.save(ckpt.tmp_dir(self.ckpt_root, at))
        dist.barrier()
        ckpt.save_rank(self.ckpt_root, at, self.rank, self.data.to_json(max(1, self.cfg.data.workers)))
        dist.barrier()
        if self.main:
            ckpt.publish(self.ckpt_root, at, self.cfg.train.keep_checkpoints)
        dist.barrier()

    def evaluate(self, whole: ImageTextModel | None = None, gathered: bool = False,
                 periodic: bool = False) -> dict[str, Any]:
        """Evaluation of the shard sets on the main process while the others wait, then the ``eval.benchmark``
        suite on every process (it shares the work out); one log record of both. A sharded model is first gathered
        into an unsharded copy, a collective step every process takes (with a benchmark, a copy on every process);
        ``gathered``: the caller already did (``whole``: the copy, None on processes that have none).
        ``periodic``: one during training, on at most ``eval.every_max_samples`` samples of each set."""
        cfg, results = self.cfg, {}
        ecfg = cfg.eval.periodic() if periodic else cfg.eval
        shard_sets = cfg.eval.zeroshot.shards or cfg.eval.retrieval.shards or cfg.eval.captioning.shards
        if not (shard_sets or self.benchmark is not None):
            return results
        if not gathered:
            whole = self.state.whole(self.main, everywhere=self.benchmark is not None)
        model = whole if whole is not None else self.core
        if self.main and shard_sets:
            results = evaluate(ecfg, model, self.device, precision=cfg.train.precision, reading=cfg.data.reading(),
                               output_dir=self.out_dir)
            for ex in results.pop("caption_examples", [])[: 0 if periodic else None]:  # examples at the end only
                self.log.info(f"caption {ex['key']}: {ex['caption']!r}   (reference: {ex['references'][0]!r})")
        if self.benchmark is not None:
            results.update(self.benchmark.run(model, self.step))
        if self.main and results:
            self.log.log({"step": self.step, **results})
        dist.barrier()
        return results if self.main else {}

    def finish(self) -> dict[str, Any]:
        """The last evaluation, ``final/`` (the trained model), every process's weight hash, plots."""
        whole = self.state.whole(self.main, everywhere=self.benchmark is not None)
        shas = {"param_sha256": self.state.hashes(whole)}
        if self.task.parameters():  # trained outside DDP: its gradient sync is ours to get right
            shas[f"{self.task.name}_sha256"] = dist.gather_object(
                params_sha256(torch.nn.ParameterList(self.task.parameters())))
        results = self.evaluate(whole, gathered=True)
        if self.main:
            for what, values in shas.items():
                if len(set(values)) != 1:
                    self.log.info(f"WARNING: {what}: parameters differ between processes: {values}")
            self.state.save_final(self.out_dir / "final", whole)
            self.log.log({"step": self.step, "final": True, **shas, "skipped_by_reason": self.data.skipped},
                         show=False)
            plots = plot_run(self.out_dir)
            self.log.info(f"final model: {self.out_dir / 'final'}; plots: {', '.join(p.name for p in plots)}")
            if self.data.skipped:
                self.log.info(f"skipped samples by reason: {self.data.skipped} (names in skipped_samples.rank*.txt)")
        dist.barrier()
        return results


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train according to ``cfg``; returns the final evaluation (empty if none configured)."""
    trainer = Trainer(cfg)
    trainer.resume()
    return trainer.train()


def main(config: str | None, overrides: list[str] = ()) -> int:
    cfg = load_run_config(config, list(overrides))  # every config error surfaces here, before any work
    tune_malloc()  # train.py / mm train own their process (mm/utils/host.py)
    results = run(cfg)
    if results:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in results.items() if isinstance(v, float))
        print(f"evaluation: {summary}")
    return 0
