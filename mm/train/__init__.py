"""Training: the run config (``config``), the checks before any work (``preflight``), the trainer as named
stages (``trainer``), the step numerics shared with fine-tuning (``step``), checkpoints, optimizer and schedule,
FSDP, adapting pretrained models, distillation, logs, and classification fine-tuning (``finetune``).

Import the module you need (``mm.train.trainer``, ``mm.train.finetune``, ...): this package imports none of
them, so reading a config does not load the trainer."""
