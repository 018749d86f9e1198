"""Evaluation: loss and perplexity, and generation task metrics."""

from tunesmith.evaluation.perplexity import evaluate_loss
from tunesmith.evaluation.task import exact_match, run_generation_task

__all__ = ["evaluate_loss", "exact_match", "run_generation_task"]
