"""Evaluation: zero-shot classification accuracy and image <-> text retrieval recall@K."""
from .retrieval import recall_at_k, retrieval_eval
from .zeroshot import load_names, predict, zero_shot_classifier, zero_shot_eval

__all__ = ["load_names", "predict", "recall_at_k", "retrieval_eval", "zero_shot_classifier", "zero_shot_eval"]
