"""Evaluation: folder evaluation to summary.json (evaluate.py); the metrics are :mod:`mipseg.metrics`."""

from mipseg.evaluation.evaluate import evaluate_folders
from mipseg.metrics import compute_metrics

__all__ = ["compute_metrics", "evaluate_folders"]
