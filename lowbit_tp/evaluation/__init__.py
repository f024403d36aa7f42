"""Evaluation: perplexity, KL, top-1 agreement and last-word accuracy of codecs on real models."""
from lowbit_tp.evaluation.evaluate import EvalConfig, evaluate_codecs
from lowbit_tp.evaluation.metrics import LMComparison, last_word_correct
from lowbit_tp.evaluation.records import CodecEvalRow

__all__ = ["CodecEvalRow", "EvalConfig", "EvalResult", "evaluate_codecs", "LMComparison", "last_word_correct"]
