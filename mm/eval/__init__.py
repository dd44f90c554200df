"""Evaluation: zero-shot classification accuracy, image <-> text retrieval recall@K, caption BLEU/CIDEr."""
from .caption_metrics import bleu, caption_scores, cider
from .captioning import caption_eval
from .retrieval import recall_at_k, retrieval_eval
from .zeroshot import load_names, predict, zero_shot_classifier, zero_shot_eval

__all__ = ["bleu", "caption_eval", "caption_scores", "cider", "load_names", "predict", "recall_at_k", "retrieval_eval", "zero_shot_classifier", "zero_shot_eval"]
