"""The stage contract: a new stage is one module (here, one class in this test) and nothing else.

A label-smoothed variant of supervised tuning is registered as a stage, trained through the real
``finetune()`` and checked against a direct computation of the smoothed loss; the loop and the
assembly are untouched by it (a real stage's section also joins ``config.stages.StageSection``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn.functional as F

from tunesmith.config import SftStage
from tunesmith.config.base import Section
from tunesmith.data import IGNORE_INDEX, encode_data
from tunesmith.stages import STAGES, Stage
from tunesmith.training.batching import collate
from tunesmith.training.loss import count_real_tokens, count_target_tokens
from tunesmith.training.objective import Objective

SMOOTHING = 0.1


class SmoothedStage(Section):
    kind: Literal["sft_smoothed"] = "sft_smoothed"
    smoothing: float = SMOOTHING


def smoothed_loss_sum(model, batch, smoothing: float) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum", label_smoothing=smoothing)


class SmoothedObjective(Objective):
    def __init__(self, smoothing: float) -> None:
        self.smoothing = smoothing

    def collate(self, examples, pad_token_id):
        return collate(examples, pad_token_id)

    def loss_sum(self, model, batch):
        return smoothed_loss_sum(model, batch, self.smoothing)

    def units(self, batch):
        return count_target_tokens(batch)

    def real_tokens(self, batch):
        return count_real_tokens(batch)

    def evaluate(self, model, examples, batch_size, pad_token_id, runtime):
        with torch.no_grad():
            batch = collate(list(examples), pad_token_id)
            return {"loss": float(self.loss_sum(model, batch)) / self.units(batch)}


@pytest.fixture
def smoothed_stage(monkeypatch):
    """Register the stage for one test (the registry is restored after)."""

    class LabelSmoothed(Stage):
        kind = "sft_smoothed"

        def encode_data(self, section, tokenizer, seed, cache):
            return encode_data(section, tokenizer, seed, cache)

        def objective(self, speed):
            return SmoothedObjective(self.config.smoothing)

    monkeypatch.setitem(STAGES._entries, "sft_smoothed", LabelSmoothed)


def test_a_new_stage_trains_through_the_real_run(smoothed_stage, tiny_recipe, tmp_path):
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.pipeline.finetune import finetune

    # A real stage's section joins config.stages.StageSection; here it is set without touching the schema.
    recipe = tiny_recipe("train.max_steps=2", "train.schedule=constant", "train.lr=1e-9")
    recipe = recipe.model_copy(update={"stage": SmoothedStage()})
    finetune(recipe, progress=False)
    logged = [json.loads(line) for line in (Path(recipe.output.dir) / "metrics.jsonl").read_text().splitlines()]

    # The first step's loss is the smoothed loss of the untouched model on step 0's examples.
    model, tokenizer = load_model_and_tokenizer(recipe.model, tmp_path / "cache")
    data = encode_data(recipe.data, tokenizer, recipe.train.seed)
    from tunesmith.training.sampler import StepSampler

    sampler = StepSampler(len(data.train), recipe.train.batch_size, recipe.train.grad_accum, seed=recipe.train.seed)
    (indices,) = sampler.micro_batches(0)
    batch = collate([data.train[i] for i in indices], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = float(smoothed_loss_sum(model, batch, SMOOTHING)) / count_target_tokens(batch)
        plain = float(smoothed_loss_sum(model, batch, 0.0)) / count_target_tokens(batch)
    assert logged[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert abs(expected - plain) > 1e-3  # the smoothed objective really ran, not the default one


def test_stage_by_name_and_unknown_stage(tiny_recipe):
    from tunesmith.core.errors import TunesmithError

    assert tiny_recipe("stage=sft").stage == SftStage()
    with pytest.raises(TunesmithError, match="stage"):
        tiny_recipe("stage=dpx")
