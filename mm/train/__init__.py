"""Training: the run config (``config``), the checks before any work (``preflight``), the trainer as named
stages (``trainer``) over its parts (tasks, executors, state, step numerics, feed, checkpoints, metrics,
evaluation), optimizer and schedule, FSDP, adapting pretrained models, distillation, logs, and classification
fine-tuning as a run of the trainer (``finetune``; its parts in ``classify``).

Import the module you need (``mm.train.trainer``, ``mm.train.finetune``, ...): this package imports none of
them, so reading a config does not load the trainer."""
