"""Judging models side by side: the `evaluate` settings and a resumable clean + robust evaluator."""
from adcorda_jax.evaluate.evaluator import Evaluator, aggregate, make_predictor
from adcorda_jax.evaluate.settings import EvaluationSettings, read_evaluation

__all__ = ["EvaluationSettings", "Evaluator", "aggregate", "make_predictor", "read_evaluation"]
