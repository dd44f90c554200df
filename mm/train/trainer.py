"""The training run: one CPU, one GPU, many GPUs or nodes (``accelerate launch``).

``run(cfg)`` reads as what a run does: set up (:class:`Trainer`'s constructor assembles the parts), ``resume``
from the newest checkpoint, ``train`` (the step loop with its periodic logs, checkpoints and evaluations),
``finish`` (final evaluation, ``final/``, plots). The parts, each in its own module:

=================  ====================================================================================
task               what is optimised (:mod:`mm.train.tasks`: contrastive, CoCa, distillation around either;
                   classification in a fine-tuning run, ``mm finetune``)
executor           how one micro-step runs it (:mod:`mm.train.executors`: plain, gradient caching)
state              how the run's weights are kept, saved, resumed, finished (:mod:`mm.train.state`)
stepper            the numerics of an optimizer step (:mod:`mm.train.step`: autocast, fp16 scaler, clipping)
feed               the data stream and its position (:mod:`mm.train.feed`)
checkpointer       ``step_N`` checkpoints (:mod:`mm.train.checkpointer`)
metrics            step records and messages (:mod:`mm.train.metrics`)
evaluator          evaluation and ``eval.benchmark`` (:mod:`mm.train.evaluator`)
=================  ====================================================================================

The loop names no objective and no kind of run: those are the parts' business.
"""
from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..config import to_dict
from ..hub import base_sha256
from ..models import ImageTextModel, ModelOutput, model_class
from ..utils import dist
from ..utils.host import tune_malloc
from ..utils.nn import params_sha256
from ..utils.precision import autocast, emulated_on_cpu
from . import adapt, classify
from . import checkpoint as ckpt
from . import fsdp as sharding
from .checkpointer import Checkpointer
from .config import RunConfig
from .evaluator import RunEvaluator
from .executors import make_executor
from .feed import Feed, image_tokens
from .log import plot_run
from .metrics import RunMetrics
from .optim import make_optimizer, make_scheduler
from .preflight import load_run_config
from .state import AdapterState, PlainState, ShardedAdapterState, ShardedState
from .step import Stepper, TrainingError
from .tasks import Task, build_task

__all__ = ["StopFlag", "Trainer", "TrainingError", "build_model", "main", "run"]


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
    on_cpu = cfg.finetune is not None and cfg.finetune.device == "cpu"  # a fine-tuning run can ask for the CPU
    acc = Accelerator(cpu=dist.use_cpu() or on_cpu, mixed_precision="no")
    from accelerate.utils import DistributedType

    if acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        # accelerate's FSDP would wrap the model its own way (mm shards it itself: train.fsdp, mm/train/fsdp.py
        # says why); DeepSpeed's engine would own the optimizer, precision and checkpoints the loop manages
        raise ValueError(f"accelerate config uses {acc.distributed_type.value}, which mm's trainer does not take "
                         "from accelerate; launch with a multi-GPU (DDP) config and set train.fsdp=true to shard "
                         "the model (mm applies FSDP2 itself), see docs/distributed.md")
    return acc


def build_model(cfg: RunConfig, device: torch.device | str = "cpu") -> ImageTextModel:
    """The model the run trains: built from ``model`` (on the CPU: the launch moves it), or in a fine-tuning run
    the model it names, loaded on ``device`` with only its image encoder trainable (:func:`classify.build_base`)."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every process
    if cfg.finetune is not None:
        return classify.build_base(cfg, torch.device(device))
    mcfg = cfg.model_config()
    model = model_class(mcfg)(mcfg)
    if cfg.train.grad_checkpointing:
        model.set_grad_checkpointing(True)
    return model


def lora_base(cfg: RunConfig) -> str | None:
    """What a LoRA run's adapter names as its base: ``train.init_from`` (a directory made absolute, so the adapter
    finds it from anywhere), else the model preset or config (random weights: None); a fine-tuning run's, the
    model it fine-tunes (:func:`classify.adapter_base`)."""
    if cfg.finetune is not None:
        return classify.adapter_base(cfg.finetune)
    spec = cfg.train.init_from
    if spec is None:
        return None
    return str(Path(spec).resolve()) if Path(spec).exists() else spec


@dataclass(frozen=True)
class Processes:
    """Where this process stands: accelerate's handle, its device, rank, the number of processes."""

    acc: Any
    device: torch.device
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0


def build_state(cfg: RunConfig, core: ImageTextModel, proc: Processes, lr_scales: dict) -> PlainState:
    """The optimizer, inside the run's state strategy: FSDP-sharded (over several processes: the model is sharded
    before the optimizer exists, which must hold the sharded parameters), adapters only (LoRA), or plain."""
    t = cfg.train
    lora = t.lora if cfg.finetune is None else cfg.finetune.lora  # a fine-tuning run's: on the image encoder
    sharded, replicated = t.fsdp and proc.world > 1, []  # one process: nothing to shard
    base_hash = base_sha256(core) if lora is not None else None  # of the whole base, before any sharding
    if sharded:
        core.to(proc.device)
        replicated = sharding.shard_model(core)
    opt = make_optimizer(core, t.lr, t.weight_decay, tuple(t.betas), t.eps, proc.device, lr_scales)
    if sharded and lora is not None:
        return ShardedAdapterState(core, opt, lora, lora_base(cfg), base_hash,
                                   sharding.EvalCopy(core, proc.device, lora), replicated)
    if sharded:
        return ShardedState(core, opt, sharding.EvalCopy(core, proc.device), replicated)
    if lora is not None:
        return AdapterState(core, opt, lora, lora_base(cfg), base_hash)
    return PlainState(core, opt)


class Trainer:
    """One training run, assembled from its parts (the module docstring lists them); then :meth:`resume`,
    :meth:`train`."""

    def __init__(self, cfg: RunConfig):
        self.cfg, t = cfg, cfg.train
        acc = make_accelerator(cfg)
        self.proc = Processes(acc, acc.device, dist.rank(), dist.world_size())
        out_dir = Path(cfg.output_dir)
        if self.proc.main:
            out_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            (out_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        dist.barrier()
        self.core = build_model(cfg, self.proc.device)
        # train.init_from weights, train.freeze, lr_mult / layer_decay; frozen modules stay in eval mode for the
        # whole run (evaluation restores every module's mode)
        frozen, lr_scales = adapt.prepare(self.core, cfg)
        adapt.set_train_mode(self.core, frozen)
        self.state = build_state(cfg, self.core, self.proc, lr_scales)
        # the objective; what it trains itself (distillation's projection) joins the optimizer before the
        # scheduler reads its groups
        self.task = build_task(cfg, self.core, self.state.opt, self.proc.device,
                               partial(autocast, self.proc.device, t.precision))
        self.state.adopt(self.task.parameters())
        self.metrics = RunMetrics(out_dir, t.steps, self.proc.rank, self.proc.main)
        self.stepper = Stepper(self.state.opt, [*self.core.parameters(), *self.task.parameters()],
                               device=self.proc.device, precision=t.precision, grad_clip=t.grad_clip,
                               max_bad_steps=t.max_bad_steps, log=self.metrics.info)
        self.sched = make_scheduler(self.state.opt, t.warmup_steps, t.steps, t.lr, t.min_lr)
        self.feed = Feed(cfg, self.core, self.proc.rank, self.proc.world, self.proc.device, out_dir)
        self.checkpointer = Checkpointer(cfg, self.state, self.task, self.stepper, self.sched, self.feed)
        self.evaluator = make_evaluator(cfg, self.proc.device, self.metrics, self.state, self.task)
        self.step = 0
        self.model = self.executor = None  # set when the loop starts (_start)

    @property
    def opt(self) -> torch.optim.Optimizer:
        return self.state.opt

    def resume(self, path: Path | None = None) -> None:
        """Continue from ``path`` (default: ``train.resume``'s choice, e.g. the newest complete checkpoint)."""
        step = self.checkpointer.resume(path)
        if step is not None:
            self.step = step

    # -- the loop ------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Steps until ``train.steps`` (or ``train.stop_after``, or a stop signal: then a checkpoint and an
        early return); then the final checkpoint and, at the last step, :meth:`finish`. Returns the last
        evaluation's results."""
        cfg = self.cfg
        end = min(cfg.train.steps, cfg.train.stop_after or cfg.train.steps)
        self.metrics.open(self.step)
        self._describe(end)
        stop = StopFlag()
        stop.install()  # before the data workers start: they inherit it, so a signal to the group spares them
        try:
            self._start()
            while self.step < end:
                if dist.any_process(stop.requested, self.proc.device):  # the signal may reach only some processes
                    self.checkpointer.save(self.step)
                    self.metrics.info(f"stopped by signal at step {self.step}; checkpoint written. Run again with "
                                      "train.resume=auto to continue.")
                    return self.evaluator.results
                losses, out = self.train_step()
                self._periodic(end, losses, out)
            self.checkpointer.save(self.step)
            if self.step >= cfg.train.steps:
                return self.finish()
            self.metrics.info(f"stopped after step {self.step} (train.stop_after); resume with train.resume=auto")
            return self.evaluator.results
        finally:
            stop.uninstall()
            self.metrics.close()
            self.feed.close()

    def _start(self) -> None:
        """Wrap the model for the processes, make the executor, open the data stream, restore the RNG."""
        cfg, acc = self.cfg, self.proc.acc
        model = torch.compile(self.core) if cfg.train.compile else self.core
        # FSDP already synchronises the gradients: no DDP wrapper
        self.model = model if self.state.sharded else acc.prepare(model)
        self.executor = make_executor(self.model, self.core, self.task, chunk=cfg.train.grad_cache_chunk,
                                      device=self.proc.device, autocast=self.stepper.autocast,
                                      scale=self.stepper.scale, backward=self.stepper.backward,
                                      no_sync=partial(acc.no_sync, self.model))
        self.feed.open()  # draws the workers' base seed from the global RNG: before restoring it
        torch.manual_seed(cfg.train.seed * 1000 + self.proc.rank + self.step)  # dropout / patch dropout per rank
        if self.checkpointer.rng is not None:
            ckpt.set_rng_state(self.checkpointer.rng)
        self.metrics.restart_clock()

    def _describe(self, end: int) -> None:
        cfg, core, t = self.cfg, self.core, self.cfg.train
        if self.checkpointer.resumed_from is not None:
            self.metrics.info(f"resumed from {self.checkpointer.resumed_from} at step {self.step}")
        n_train = sum(p.numel() for p in core.parameters() if p.requires_grad)
        self.metrics.info(
            f"training {cfg.model if isinstance(cfg.model, str) else 'model'}"
            f"{f' from {t.init_from}' if t.init_from else ''}: "
            f"{sum(p.numel() for p in core.parameters()):,} parameters ({n_train:,} trained"
            f"{f', frozen: {t.freeze}' if t.freeze else ''}"
            f"{f', LoRA rank {t.lora.rank} on {t.lora.targets}' if t.lora else ''}), "
            f"{self.proc.world} process(es)"
            f"{' (FSDP)' if self.state.sharded else ''} on {self.proc.device}, "
            f"batch {cfg.data.batch_size} x {self.proc.world} x accum {t.grad_accum}, steps {self.step} -> {end}"
            f"{f', gradient caching in chunks of {t.grad_cache_chunk}' if t.grad_cache_chunk else ''}")
        if self.task.describe():
            self.metrics.info(self.task.describe())
        if self.proc.device.type == "cpu" and emulated_on_cpu(t.precision):
            self.metrics.info("WARNING: train.precision bf16 on a CPU without native bf16 (AVX-512 BF16 / AMX): every "
                              "matmul is emulated, ~20x slower than fp32 here; set train.precision=fp32")
        if self.step == 0:
            self.metrics.log({"step": 0, "world_size": self.proc.world, "device": str(self.proc.device)}, show=False)

    def train_step(self) -> tuple[dict[str, torch.Tensor], ModelOutput]:
        """One optimizer step over ``train.grad_accum`` micro-batches; returns the last micro-batch's losses
        and model output."""
        accum = self.cfg.train.grad_accum
        losses = out = None
        self.task.begin_step(self.step)  # a scheduled objective switches on here
        for micro in range(accum):
            batch = self.feed.next(self.metrics.note)
            losses, out = self.executor.step(batch, divide=accum, sync=micro == accum - 1)
            self.metrics.count(len(batch["keys"]) * self.proc.world,
                               *(n * self.proc.world for n in image_tokens(batch["images"], self.core.config)))
        self.task.sync_grads()  # what the task trains itself is outside DDP
        self.state.sync_grads()
        self.stepper.step(self.step + 1)
        self.task.end_step(self.step + 1)  # what follows the weights (an EMA teacher)
        self.sched.step()
        if self.core.logit_scale.requires_grad:  # a frozen scale stays bit-identical
            with torch.no_grad():
                self.core.logit_scale.clamp_(0, math.log(100))  # CLIP: temperature capped at 100
        self.step += 1
        self.metrics.advance()
        return losses, out

    def _periodic(self, end: int, losses: dict[str, torch.Tensor], out: ModelOutput) -> None:
        """What happens every ``train.log_every`` / ``checkpoint_every`` / ``eval.every`` steps."""
        cfg, step = self.cfg, self.step
        if step % cfg.train.log_every == 0 or step == end:
            # the base rate: group 0 may be scaled (train.lr_mult / layer_decay)
            lr = self.sched.get_last_lr()[0] / self.opt.param_groups[0].get("lr_scale", 1.0)
            self.metrics.step_record(step, end, cfg.train.log_every, losses, out, lr=lr,
                                     logit_scale=self.core.logit_scale.exp().item(), norm=self.stepper.norm,
                                     skipped_samples=sum(self.feed.state.skipped.values()),
                                     skipped_steps=self.stepper.skipped, extra=self.executor.log_record,
                                     moe_layers=self.core.moe_layers())
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < end:
            self.checkpointer.save(step)
        if cfg.eval.every and step % cfg.eval.every == 0 and step < end:
            self.evaluate(periodic=True)

    def evaluate(self, whole: torch.nn.Module | None = None, periodic: bool = False) -> dict[str, Any]:
        """Evaluate ``whole`` (default: the run's whole model, gathered from the shards where sharded: a collective
        step every process takes) and log it (:class:`~mm.train.evaluator.RunEvaluator`)."""
        if not self.evaluator.enabled:
            return {}
        if whole is None:
            whole = self.state.whole(self.proc.main, everywhere=self.evaluator.everywhere)
        return self.evaluator.run(whole if whole is not None else self.core, self.step, periodic)

    def finish(self) -> dict[str, Any]:
        """The last evaluation, ``final/`` (the trained model), every process's weight hash, plots."""
        whole = self.state.whole(self.proc.main, everywhere=self.evaluator.everywhere)
        shas = {"param_sha256": self.state.hashes(whole)}
        if self.cfg.data.naflex is not None:  # the token-budget schedule each process took (the same on all)
            shas["batch_shapes_sha256"] = dist.gather_object(self.feed.state.shapes)
        if self.task.parameters():  # trained outside DDP: its gradient sync is ours to get right
            shas[f"{self.task.name}_sha256"] = dist.gather_object(
                params_sha256(torch.nn.ParameterList(self.task.parameters())))
        results = self.evaluate(whole if whole is not None else self.core)
        if self.proc.main:
            self._save_final(whole, shas)
        dist.barrier()
        return results

    def _save_final(self, whole: torch.nn.Module | None, shas: dict[str, list[str]]) -> None:
        out_dir, final = Path(self.cfg.output_dir), final_dir(self.cfg)
        for what, values in shas.items():
            if len(set(values)) != 1:
                self.metrics.info(f"WARNING: {what}: parameters differ between processes: {values}")
        self.state.save_final(final, whole)
        self.task.save_final(final)
        skipped = self.feed.state.skipped
        self.metrics.log({"step": self.step, "final": True, **shas, "skipped_by_reason": skipped}, show=False)
        plots = plot_run(out_dir)
        self.metrics.info(f"final model: {final}; plots: {', '.join(p.name for p in plots)}")
        if skipped:
            self.metrics.info(f"skipped samples by reason: {skipped} (names in skipped_samples.rank*.txt)")


def make_evaluator(cfg: RunConfig, device: torch.device, metrics: RunMetrics, state: PlainState,
                   task: Task) -> RunEvaluator | classify.WiseEvaluator:
    """The ``eval`` section's evaluation, or a fine-tuning run's: WiSE-FT on its test split (made before a resume:
    it keeps the zero-shot endpoint)."""
    if cfg.finetune is not None:
        return classify.WiseEvaluator(cfg, device, metrics, state, task)
    return RunEvaluator(cfg, device, metrics)


def final_dir(cfg: RunConfig) -> Path:
    """Where the trained model goes: ``final/``; a fine-tuning run's classifier: ``finetuned/``."""
    return Path(cfg.output_dir) / ("finetuned" if cfg.finetune is not None else "final")


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
