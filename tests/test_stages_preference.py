"""Stages rm and dpo: log-probabilities against plain transformers, losses and gradients against TRL,
the reference really is the base, and short end-to-end runs on tiny_llama."""

from __future__ import annotations

import json
import tempfile
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tiny_files import kto_file
from tunesmith.config import DpoStage, LoraMethod, ModelSection
from tunesmith.core.errors import TunesmithError
from tunesmith.core.runtime import Runtime
from tunesmith.data.preference import EncodedPair, encode_pairs
from tunesmith.data.readers import read_records
from tunesmith.methods import build_method
from tunesmith.models.loading import load_model, load_tokenizer
from tunesmith.pipeline.finetune import finetune
from tunesmith.stages.dpo import DpoObjective
from tunesmith.stages.pairs import Reference
from tunesmith.stages.rm import RewardObjective, load_reward_model, score_conversations
from tunesmith.stages.scoring import add_head, reply_logps
from tunesmith.training.batching import collate
from tunesmith.training.chunked_loss import plain_loss_sum
from tunesmith.training.packing import enable_packed_attention, pack_collate, restore_attention
from tunesmith.training.speed import SpeedSetup

from conftest import TINY_PAIRS


def load(tiny_llama):
    section = ModelSection(name=tiny_llama)
    return load_model(tiny_llama, section), load_tokenizer(tiny_llama, section)


def demo_pairs(tokenizer, count: int = 6, max_length: int = 96) -> list[EncodedPair]:
    from tunesmith.data.templates import resolve_template

    resolve_template(tokenizer, "simple")
    records = list(read_records(TINY_PAIRS))
    pairs, _ = encode_pairs(records[:40], tokenizer, max_length)
    return pairs[:count]


def padded_speed() -> SpeedSetup:
    return SpeedSetup(plain_loss_sum, collate, packing=False, autocast_dtype=None)


LORA = LoraMethod(r=4, alpha=8, dropout=0.0)


def lora_model(tiny_llama, seed: int = 0):
    """tiny_llama with LoRA whose B matrices are random (so the policy differs from the base)."""
    model, tokenizer = load(tiny_llama)
    return randomise_lora(build_method(LORA).apply(model), seed), tokenizer


def randomise_lora(model, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model


def direct_logps(model, pair_side) -> float:
    """log p(reply | prompt) by plain transformers on the unpadded sequence."""
    ids = torch.tensor([pair_side.input_ids])
    logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    labels = torch.tensor(pair_side.labels[1:])
    scored = labels != -100
    return float(logits[scored].gather(1, labels[scored, None]).sum())


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_reply_logps_equal_plain_transformers(tiny_llama, packed):
    model, tokenizer = load(tiny_llama)
    pairs = demo_pairs(tokenizer, 4)
    sides = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    expected = [direct_logps(model, side) for side in sides]
    if packed:
        assert enable_packed_attention(model)
    batch = (pack_collate if packed else collate)(sides, tokenizer.pad_token_id)
    with torch.no_grad():
        sums, counts = reply_logps(model, batch)
    restore_attention(model)
    assert sums.tolist() == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert counts.tolist() == [side.num_target_tokens for side in sides]


def trl_dpo_trainer(model, tokenizer, tmp_path, loss: str, beta: float, label_smoothing: float, ref_model=None,
                    peft_config=None):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / "trl"), beta=beta, loss_type=[loss], label_smoothing=label_smoothing,
                     report_to="none", use_cpu=True, max_length=None, per_device_train_batch_size=2,
                     bf16=False)
    dataset = Dataset.from_dict({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]})
    return DPOTrainer(model=model, ref_model=ref_model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


def trl_batch(pairs: list[EncodedPair], pad_token_id: int) -> dict:
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    rows = [{"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids), "rejected_ids": list(p.rejected_ids)}
            for p in pairs]
    return DataCollatorForPreference(pad_token_id=pad_token_id)(rows)


def assert_same_gradients(ours: dict, trl: dict, rtol: float, noise: float) -> None:
    """Every gradient equal; TRL's chunked log-softmax sums in another order, so allow ``noise`` x the largest."""
    scale = max(float(g.abs().max()) for g in trl.values())
    assert set(ours) == set(trl) and ours
    for name in trl:
        torch.testing.assert_close(ours[name], trl[name], rtol=rtol, atol=noise * scale)


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("loss, label_smoothing", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_dpo_loss_and_gradients_equal_trl(tiny_llama, tmp_path, loss, label_smoothing):
    base, tokenizer = load(tiny_llama)
    pairs = demo_pairs(tokenizer, 4)
    # TRL adds the adapter itself (a PeftModel handed to it would be copied as its reference).
    trainer = trl_dpo_trainer(base, tokenizer, tmp_path, loss, 0.3, label_smoothing,
                              peft_config=build_method(LORA).peft_config(base))
    model = randomise_lora(trainer.model)
    model.train()
    trl_loss = trainer.compute_loss(trainer.model, trl_batch(pairs, tokenizer.pad_token_id))
    trl_loss.backward()
    trl_grads = gradients(model)
    config = DpoStage(loss=loss, beta=0.3, label_smoothing=label_smoothing)
    objective = DpoObjective(padded_speed(), config, Reference(model))
    batch = objective.collate(pairs, tokenizer.pad_token_id)
    ours = objective.loss_sum(model, batch) / objective.units(batch)
    ours.backward()
    our_grads = gradients(model)
    assert float(ours) == pytest.approx(float(trl_loss), rel=1e-4, abs=1e-6)
    assert float(ours) != 0
    assert_same_gradients(our_grads, trl_grads, rtol=1e-3, noise=1e-4)


def test_dpo_label_smoothing_golden():
    """Conservative DPO (TRL's sigmoid no longer takes label_smoothing): hand-computed on small tensors."""
    from tunesmith.stages.losses import dpo

    chosen, rejected = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    delta = torch.tensor([0.5 - (-1.0), -1.0 - 0.5])  # (c - rc) - (r - rr)
    beta, e = 0.5, 0.1
    expected = -(1 - e) * torch.log(torch.sigmoid(beta * delta)) - e * torch.log(torch.sigmoid(-beta * delta))
    ones = torch.ones(2)
    got = dpo(chosen, rejected, ref_chosen, ref_rejected, ones, ones, "sigmoid", beta, e)
    torch.testing.assert_close(got, expected)
    # 0.9 * log(1 + e^-0.75) + 0.1 * log(1 + e^0.75) = 0.4619, and the same with the signs swapped.
    assert got.tolist() == pytest.approx([0.4619, 1.0619], abs=1e-4)


def test_dpo_full_fine_tuning_equals_trl_with_a_reference_copy(tiny_llama, tmp_path):
    model, tokenizer = load(tiny_llama)
    reference = Reference(model)  # taken before training, as after_method does
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    pairs = demo_pairs(tokenizer, 3)
    base, _ = load(tiny_llama)
    trainer = trl_dpo_trainer(model, tokenizer, tmp_path, "sigmoid", 0.1, 0.0, ref_model=base)
    trl_loss = trainer.compute_loss(trainer.model, trl_batch(pairs, tokenizer.pad_token_id))
    objective = DpoObjective(padded_speed(), DpoStage(), reference)
    batch = objective.collate(pairs, tokenizer.pad_token_id)
    assert float(objective.loss_sum(model, batch) / 3) == pytest.approx(float(trl_loss), rel=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_reference_is_the_separately_loaded_base(tiny_llama, method):
    if method == "lora":
        model, tokenizer = lora_model(tiny_llama)
    else:
        model, tokenizer = load(tiny_llama)
    reference = Reference(model)
    assert (reference.copy is None) == (method == "lora")  # adapters: no second copy
    if method == "full":
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.mul_(1.05)
    pairs = demo_pairs(tokenizer, 3)
    batch = collate([p.chosen for p in pairs], tokenizer.pad_token_id)
    base, _ = load(tiny_llama)
    with torch.no_grad():
        expected, _ = reply_logps(base, batch)
        trained, _ = reply_logps(model, batch)
    got, _ = reference.logps(model, batch)
    torch.testing.assert_close(got, expected)
    assert (trained - expected).abs().max() > 1e-2  # the trained model really differs from its reference


def test_reward_loss_equals_trl_reward_trainer(tiny_llama):
    pytest.importorskip("trl")
    from trl import RewardTrainer

    model, tokenizer = load(tiny_llama)
    add_head(model, 1)
    pairs = demo_pairs(tokenizer, 4)
    objective = RewardObjective(padded_speed(), margin=0.0)
    batch = objective.collate(pairs, tokenizer.pad_token_id)

    class ScoresAsLogits(torch.nn.Module):  # what TRL's AutoModelForSequenceClassification would return
        def forward(self, input_ids, attention_mask, use_cache=False, margin=None):
            from tunesmith.stages.scoring import sequence_scores

            return SimpleNamespace(logits=sequence_scores(model, {"input_ids": input_ids,
                                                                  "attention_mask": attention_mask}))

    trainer = object.__new__(RewardTrainer)  # compute_loss is all of TRL that is needed here
    trainer.model, trainer.args = model, SimpleNamespace(center_rewards_coefficient=None)
    trainer.accelerator = SimpleNamespace(gather=lambda x: x, gather_for_metrics=lambda x: x)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    model.eval()
    trl_loss = trainer.compute_loss(ScoresAsLogits(), {"input_ids": batch["input_ids"],
                                                       "attention_mask": batch["attention_mask"]})
    ours = objective.loss_sum(model, batch) / objective.units(batch)
    assert float(ours) == pytest.approx(float(trl_loss), rel=1e-5)
    margin = RewardObjective(padded_speed(), margin=0.5)
    trl_margin = trainer.compute_loss(ScoresAsLogits(), {"input_ids": batch["input_ids"], "margin": torch.tensor(0.5),
                                                         "attention_mask": batch["attention_mask"]})
    assert float(margin.loss_sum(model, batch) / 4) == pytest.approx(float(trl_margin), rel=1e-5)


def pair_recipe(tiny_llama, tmp_path, stage, *overrides, output="run"):
    from test_stages_text import recipe

    data = {"train": str(TINY_PAIRS), "max_length": 256, "template": "simple",
            "validation_fraction": 0.1}
    return recipe(tiny_llama, tmp_path, stage, data, "train.max_steps=8", *overrides, output=output)


def records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_reward_model_trains_saves_and_reloads_as_a_scorer(tiny_llama, tmp_path):
    from tunesmith.stages import build_stage

    recipe = pair_recipe(tiny_llama, tmp_path, "rm", "train.max_steps=12", 'train.speed.autocast="off"')
    summary = finetune(recipe, progress=False)
    assert {"loss", "accuracy", "margin", "chosen_reward", "rejected_reward"} <= set(summary["validation"])
    assert (tmp_path / "run" / "adapter" / "head.safetensors").is_file()
    model, tokenizer = load_reward_model(tmp_path / "run" / "adapter")
    data = build_stage(recipe.stage).encode_data(recipe.data, tokenizer, recipe.train.seed, tmp_path)
    again = RewardObjective(padded_speed(), 0.0).evaluate(model, data.validation, 8, tokenizer.pad_token_id,
                                                          Runtime(torch.device("cpu")))
    assert again["loss"] == pytest.approx(summary["validation"]["loss"], rel=1e-5)  # the head came back
    question = [{"role": "user", "content": "Tell me a story."}]
    scores = score_conversations(model, tokenizer, [question + [{"role": "assistant", "content": reply}]
                                                    for reply in ("Once upon a time.", "No.", "Once upon a time.")])
    assert scores[0] == pytest.approx(scores[2]) and scores[0] != scores[1]


@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_resume_is_exact(tiny_llama, tmp_path, stage):
    from test_training import StopAt, trained_weights

    common = ("train.max_steps=6", "train.checkpoint_every=3", "data.validation_fraction=0.0")
    finetune(pair_recipe(tiny_llama, tmp_path, stage, *common, output="straight"), progress=False)
    recipe = pair_recipe(tiny_llama, tmp_path, stage, *common, output="stopped")
    with pytest.raises(TunesmithError, match="step-00000003"):
        finetune(recipe, extra_hooks=[StopAt(4)], progress=False)
    finetune(recipe, resume=True, progress=False)
    straight = [r["loss"] for r in records(tmp_path / "straight")]
    assert [r["loss"] for r in records(tmp_path / "stopped")] == pytest.approx(straight, rel=1e-6)
    for name, value in trained_weights(tmp_path / "straight").items():
        torch.testing.assert_close(trained_weights(tmp_path / "stopped")[name], value)
    if stage == "dpo":  # the result generates like an SFT result
        from tunesmith.inference.generate import generate, load_for_inference

        model, tokenizer = load_for_inference(tiny_llama, str(tmp_path / "stopped" / "adapter"))
        replies = generate(model, tokenizer, [[{"role": "user", "content": "Tell me a story."}]], max_new_tokens=8)
        assert len(replies) == 1 and isinstance(replies[0], str) and replies[0]


def trl_self(**attributes):
    """What TRL's loss methods read from their trainer (they are plain functions of tensors otherwise)."""
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **attributes)


def reference_free_losses(stage: str, model, pairs, tokenizer, **config):
    """(TRL's mean loss over the pairs, computed one pair at a time; ours over the batch), both with gradients."""
    from trl.experimental.cpo import CPOTrainer
    from trl.experimental.orpo import ORPOTrainer

    from tunesmith.config import OrpoStage, SimpoStage
    from tunesmith.stages.orpo import ReferenceFreeObjective

    trl_total = 0.0
    for pair in pairs:
        batch = collate([pair.chosen, pair.rejected], tokenizer.pad_token_id)
        sums, counts = reply_logps(model, batch)
        averages = sums / counts
        if stage == "orpo":
            nll = plain_loss_sum(model, collate([pair.chosen], tokenizer.pad_token_id)) / counts[0]
            terms = ORPOTrainer.odds_ratio_loss(trl_self(beta=config["beta"]), averages[:1], averages[1:])[0]
            trl_total = trl_total + nll - terms.mean()
        else:
            fake = trl_self(beta=config["beta"], alpha=0.0, loss_type="simpo", simpo_gamma=config["gamma"],
                            label_smoothing=config["label_smoothing"])
            trl_total = trl_total + CPOTrainer.cpo_loss(fake, averages[:1], averages[1:])[0].mean()
    section = OrpoStage(**config) if stage == "orpo" else SimpoStage(**config)
    objective = ReferenceFreeObjective(padded_speed(), section)
    batch = objective.collate(pairs, tokenizer.pad_token_id)
    return trl_total / len(pairs), objective.loss_sum(model, batch) / objective.units(batch)


@pytest.mark.parametrize("stage, config", [("orpo", {"beta": 0.2}),
                                           ("simpo", {"beta": 2.0, "gamma": 0.7, "label_smoothing": 0.1})])
def test_reference_free_losses_and_gradients_equal_trl(tiny_llama, stage, config):
    pytest.importorskip("trl")
    model, tokenizer = load(tiny_llama)
    pairs = demo_pairs(tokenizer, 3)
    trl_loss, ours = reference_free_losses(stage, model, pairs, tokenizer, **config)
    trl_loss.backward()
    trl_grads = gradients(model)
    _, ours = reference_free_losses(stage, model, pairs, tokenizer, **config)
    ours.backward()
    our_grads = gradients(model)
    assert float(ours) == pytest.approx(float(trl_loss), rel=1e-5)
    assert_same_gradients(our_grads, trl_grads, rtol=1e-4, noise=1e-5)


def kto_examples(tokenizer, count: int = 4, max_length: int = 160):
    from tunesmith.data.preference import encode_labelled
    from tunesmith.data.templates import resolve_template

    resolve_template(tokenizer, "simple")
    rows = list(read_records(kto_file(Path(tempfile.mkdtemp()) / "kto.json", 150)))
    examples, _ = encode_labelled(rows[:150], tokenizer, max_length)
    good = [e for e in examples if e.desirable][: count // 2]
    bad = [e for e in examples if not e.desirable][: count // 2]
    return [item for pair in zip(good, bad) for item in pair]


def test_kto_loss_and_gradients_equal_trl(tiny_llama, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer
    from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

    from tunesmith.config import KtoStage
    from tunesmith.stages.kto import KtoObjective

    base, tokenizer = load(tiny_llama)
    examples = kto_examples(tokenizer, 4)
    args = KTOConfig(output_dir=str(tmp_path / "trl"), beta=0.3, desirable_weight=1.0, undesirable_weight=1.5,
                     report_to="none", use_cpu=True, bf16=False, max_length=None, per_device_train_batch_size=4)
    dataset = Dataset.from_dict({"prompt": ["a", "b"], "completion": ["c", "d"], "label": [True, False]})
    trainer = KTOTrainer(model=base, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=build_method(LORA).peft_config(base))
    model = randomise_lora(trainer.model)
    model.train()
    rows = [{"prompt_ids": list(e.prompt_ids), "completion_ids": list(e.reply_ids), "label": e.desirable,
             "KL_completion_ids": list(examples[i - 1].reply_ids)} for i, e in enumerate(examples)]
    trl_loss = trainer.compute_loss(trainer.model, DataCollatorForUnpairedPreference(tokenizer.pad_token_id)(rows))
    trl_loss.backward()
    trl_grads = gradients(model)
    objective = KtoObjective(padded_speed(), KtoStage(beta=0.3, undesirable_weight=1.5), Reference(model))
    batch = objective.collate(examples, tokenizer.pad_token_id)
    ours = objective.loss_sum(model, batch) / objective.units(batch)
    ours.backward()
    our_grads = gradients(model)
    assert float(ours) == pytest.approx(float(trl_loss), rel=1e-4)
    assert_same_gradients(our_grads, trl_grads, rtol=1e-3, noise=1e-4)
