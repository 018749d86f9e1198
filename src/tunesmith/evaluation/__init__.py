"""Evaluation: loss and perplexity, and generation task metrics."""

from tunesmith.evaluation.task import run_generation_task
from tunesmith.training.validation import evaluate_loss

__all__ = ["evaluate_loss", "run_generation_task"]
