"""Evaluation settings: the ``eval`` section of a run config (zero-shot, retrieval and captioning shard sets),
and how evaluation reads shards (:class:`ShardReading`: a run's ``data`` settings, or a command's flags)."""
from __future__ import annotations

from dataclasses import dataclass, field

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
    batch_size: int = 256  # images per evaluation batch
    zeroshot: ZeroShotConfig = field(default_factory=ZeroShotConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    captioning: CaptioningConfig = field(default_factory=CaptioningConfig)


@dataclass
class ShardReading:
    """How the evaluator reads shards; not a config section (the trainer fills it from ``data``)."""

    workers: int = 2  # DataLoader worker processes (0 = in this process)
    prefetch_factor: int = 4  # batches loaded ahead per worker
    image_keys: tuple[str, ...] = IMAGE_KEYS  # the first member present holds the image
    text_key: str = "txt"  # the member holding the caption
    max_pixels: int = MAX_PIXELS  # larger images are skipped as decompression bombs
