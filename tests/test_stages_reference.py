"""``stage.precompute_reference`` (dpo, kto): the reference's log-probabilities computed once before the first step
give the losses and gradients of the on-the-fly reference, training runs no reference forward, and resume is exact."""

from __future__ import annotations

import pytest
import torch

from test_stages_preference import demo_pairs, gradients, kto_examples, lora_model, padded_speed, pair_recipe, records
from test_training import trained_weights
from tunesmith.config import DpoStage, KtoStage
from tunesmith.core.errors import TunesmithError
from tunesmith.core.runtime import Runtime
from tunesmith.pipeline.finetune import finetune
from tunesmith.stages.dpo import DpoObjective
from tunesmith.stages.kto import KtoObjective
from tunesmith.stages.pairs import Reference, ReferenceTable

from conftest import StopAt


@pytest.mark.parametrize("stage", ["dpo", "kto"])
def test_precomputed_reference_gives_the_same_loss_and_gradients(tiny_llama, tmp_path, stage):
    model, tokenizer = lora_model(tiny_llama)
    if stage == "dpo":
        examples, objective_class, config = demo_pairs(tokenizer, 6), DpoObjective, DpoStage(precompute_reference=True)
    else:
        examples, objective_class, config = kto_examples(tokenizer, 6), KtoObjective, KtoStage(precompute_reference=True)
    micro_batches = [examples[:3], examples[3:]]
    results = []
    for precompute in (False, True):
        reference = Reference(model)
        objective = objective_class(padded_speed(), config, reference)
        if precompute:
            objective.before_training(model, iter(micro_batches), [examples], 4, tokenizer.pad_token_id,
                                      Runtime(torch.device("cpu")), tmp_path)
        forwards = reference.forwards
        model.zero_grad()
        batches = [objective.collate(examples, tokenizer.pad_token_id) for examples in micro_batches]
        units = sum(objective.units(batch) for batch in batches)
        loss = sum(objective.loss_sum(model, batch) for batch in batches) / units
        loss.backward()
        validation = objective.evaluate(model, examples, 4, tokenizer.pad_token_id, Runtime(torch.device("cpu")))
        if precompute:
            assert reference.forwards == forwards  # neither the steps nor validation ran the reference
            assert all("reference_logps" in batch for batch in batches)
        results.append((float(loss), gradients(model), validation))
    (loss, grads, validation), (precomputed_loss, precomputed_grads, precomputed_validation) = results
    assert precomputed_loss == pytest.approx(loss, abs=1e-5)
    for name, value in grads.items():
        torch.testing.assert_close(precomputed_grads[name], value, rtol=1e-5, atol=1e-5)
    assert precomputed_validation == pytest.approx(validation, abs=1e-5)
    kept = ReferenceTable.read(tmp_path / ReferenceTable.FILE)
    assert kept.values == reference.table.values and len(kept.values) >= 2 * len(examples)


def test_precomputed_reference_resumes_exactly(tiny_llama, tmp_path, capsys):
    common = ("train.max_steps=6", "train.checkpoint_every=3", "data.validation_fraction=0.0",
              'train.speed.autocast="off"')
    finetune(pair_recipe(tiny_llama, tmp_path, "dpo", *common, output="on-the-fly"), progress=False)
    recipe = pair_recipe(tiny_llama, tmp_path, {"kind": "dpo", "precompute_reference": True}, *common,
                         output="stopped")
    with pytest.raises(TunesmithError, match="step-00000003"):
        finetune(recipe, extra_hooks=[StopAt(4)], progress=False)
    assert "precomputing the reference" in capsys.readouterr().out
    assert (tmp_path / "stopped" / "checkpoints" / ReferenceTable.FILE).is_file()
    finetune(recipe, resume=True, progress=False)
    assert "precomputing the reference" not in capsys.readouterr().out  # read back, nothing left to compute
    expected = [r["loss"] for r in records(tmp_path / "on-the-fly")]
    assert [r["loss"] for r in records(tmp_path / "stopped")] == pytest.approx(expected, rel=1e-5)
    for name, value in trained_weights(tmp_path / "on-the-fly").items():
        torch.testing.assert_close(trained_weights(tmp_path / "stopped")[name], value, rtol=1e-5, atol=1e-6)
