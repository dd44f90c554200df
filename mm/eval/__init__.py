"""Evaluation: zero-shot classification accuracy, image <-> text retrieval recall@K, caption BLEU/CIDEr, linear
probes, and the runner that evaluates shard sets (during training and for ``mm eval``) with its own config."""
from .caption_metrics import bleu, caption_scores, cider
from .captioning import caption_eval
from .config import (
           CaptioningConfig,
           EvalConfig,
           RetrievalConfig,
           ShardReading,
           ZeroShotConfig,
)
from .retrieval import recall_at_k, retrieval_eval
from .runner import evaluate
from .zeroshot import load_names, predict, zero_shot_classifier, zero_shot_eval

__all__ = ["CaptioningConfig", "EvalConfig", "RetrievalConfig", "ShardReading", "ZeroShotConfig", "bleu",
           "caption_eval", "caption_scores", "cider", "evaluate", "load_names", "predict", "recall_at_k",
           "retrieval_eval", "zero_shot_classifier", "zero_shot_eval"]
