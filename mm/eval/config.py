"""Evaluation settings: the ``eval`` section of a run config (zero-shot, retrieval and captioning shard sets),
and how evaluation reads shards (:class:`ShardReading`: a run's ``data`` settings, or a command's flags)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from ..data.decode import IMAGE_KEYS, MAX_PIXELS
from ..inference.generate import GenerationConfig


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
    # the evaluations every `every` steps read at most this many samples of each set (a cheap curve); the final
    # evaluation reads what each set's max_samples says; null = the same as the final
    every_max_samples: int | None = None
    batch_size: int = 256  # images per evaluation batch
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)
    # an `mm benchmark --suite` YAML (datasets and tasks; no `models`: the model is the one training), scored in full
    # at every evaluation (every_max_samples does not apply) by every process: results in RUN_DIR/benchmark/step_N/
    # (clip_benchmark's JSON files, results.csv / .md); logged with the other evaluation metrics: each entry's main
    # metric as benchmark/DATASET/TASK (DATASET without wds/), their mean as benchmark_average (when no entry
    # failed; else benchmark_failed, the count); null = none
    benchmark: str | None = None

    def check(self) -> Iterator[tuple[str, str]]:
        if self.every < 0:
            yield "every", f"must be >= 0, got {self.every}"
        if self.every_max_samples is not None and self.every_max_samples < 1:
            yield "every_max_samples", f"must be >= 1 or null, got {self.every_max_samples}"
        if self.batch_size < 1:
            yield "batch_size", f"must be >= 1, got {self.batch_size}"

    def periodic(self) -> EvalConfig:
        """The config of an evaluation during training: each set capped at ``every_max_samples``."""
        if self.every_max_samples is None:
            return self
        cap = self.every_max_samples
        sets = {name: replace(getattr(self, name), max_samples=min(getattr(self, name).max_samples or cap, cap))
                for name in ("zeroshot", "retrieval", "captioning")}
        return replace(self, **sets)


@dataclass
class ShardReading:
    """How the evaluator reads shards; not a config section (the trainer fills it from ``data``)."""

    workers: int = 2  # DataLoader worker processes (0 = in this process)
    prefetch_factor: int = 4  # batches loaded ahead per worker
    image_keys: tuple[str, ...] = IMAGE_KEYS  # the first member present holds the image
    text_key: str = "txt"  # the member holding the caption
    max_pixels: int = MAX_PIXELS  # larger images are skipped as decompression bombs
    seq_len: int | None = None  # NaFlex: each image at its own aspect ratio, at most this many patches; None: square
