"""``stage: grpo`` end to end: reward rises (stories260k), resume is exact, the reference is the base, bad input.

The toy task is verifiable and learnable in a few steps: the reward is 1 when stories260k's
completion of a story opening contains the word "she" (it says it in about 3% of samples). The
other tests run on the session's random tiny Llama (no ../shared needed) with a length reward,
which varies between completions and so gives non-zero advantages.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config import validate_recipe
from tunesmith.core.errors import TunesmithError
from tunesmith.pipeline.finetune import finetune

from conftest import StartedAt, StopAt

NAMES = ["Lily", "Tom", "Ben", "Sue", "Max", "Amy", "Sam", "Mia"]


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Once upon a time, {name} went to the park.", "answer": "ball"})
                            + "\n" for name in NAMES * 4))
    return path


@pytest.fixture
def grpo_recipe(tiny_llama, prompts, tmp_path):
    def make(*overrides: str, output: str = "run", **stage):
        from tunesmith.config import apply_override

        raw = {
            "model": {"name": tiny_llama},
            "data": {"train": str(prompts), "max_length": 96, "template": "simple"},
            "stage": {"kind": "grpo", "group_size": 8, "max_new_tokens": 16, "beta": 0.04,
                      "rewards": [{"kind": "length", "target": 6, "name": "short"}], **stage},
            "method": {"kind": "lora", "r": 8, "alpha": 16, "dropout": 0.0},
            "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "log_every": 1, "seed": 0, "schedule": "constant"},
            "output": {"dir": str(tmp_path / output)},
        }
        for override in overrides:
            apply_override(raw, override)
        return validate_recipe(raw)

    return make


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "reward" in line]


def test_reward_rises_on_a_verifiable_toy_task(grpo_recipe, stories260k, prompts, tmp_path):
    recipe = grpo_recipe(f"model.name={stories260k}", f"data.validation={prompts}",
                         rewards=[{"kind": "format", "pattern": r"\bshe\b", "name": "says_she"}])
    summary = finetune(recipe, progress=False)
    logged = [r for r in records(tmp_path / "run") if "loss" in r and "val_loss" not in r]
    rewards = [r["reward"] for r in logged]
    assert len(rewards) == 6
    assert sum(rewards[-2:]) / 2 > rewards[0] + 0.4, rewards  # measured: 0.03 -> 0.97
    first = logged[0]
    assert first["reward/says_she"] == first["reward"]  # one reward of weight 1
    assert 0 < first["generate_s"] < first["step_s"] and first["kl"] == pytest.approx(0.0, abs=1e-6)
    assert logged[-1]["kl"] > 0  # the policy moved away from the reference
    assert {"prompt", "completion", "reward"} <= set(first["samples"][0])
    assert {"loss", "reward", "reward/says_she", "completion_length"} <= set(summary["validation"])


def test_resume_is_exact_sampling_included(grpo_recipe, tmp_path):
    common = ("train.max_steps=4", "train.checkpoint_every=2", "train.batch_size=2")
    finetune(grpo_recipe(*common, output="straight", group_size=4, max_new_tokens=8), progress=False)
    stopped = grpo_recipe(*common, output="stopped", group_size=4, max_new_tokens=8)
    with pytest.raises(TunesmithError, match="step-00000002"):
        finetune(stopped, extra_hooks=[StopAt(3)], progress=False)
    started = StartedAt()
    finetune(stopped, resume=True, progress=False, extra_hooks=[started])
    assert started.step == 2
    straight, resumed = records(tmp_path / "straight"), records(tmp_path / "stopped")
    assert [r["samples"] for r in resumed] == [r["samples"] for r in straight]  # the same completions sampled
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in straight], rel=1e-6)
    weights = [load_file(tmp_path / run / "adapter" / "adapter_model.safetensors") for run in ("straight", "stopped")]
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name])


@pytest.mark.parametrize("stage", [{"loss_type": "dapo", "epsilon_high": 0.28}, {"loss_type": "dr_grpo",
                                   "scale_rewards": "none"}, {"estimator": "rloo", "normalize_advantages": True}])
def test_every_estimator_and_loss_type_trains(grpo_recipe, stage, tmp_path):
    summary = finetune(grpo_recipe("train.max_steps=2", "train.batch_size=2", group_size=4, max_new_tokens=8,
                                   **stage), progress=False)
    assert summary["steps"] == 2 and all("reward" in r for r in records(tmp_path / "run"))


def test_peft_reference_is_the_separately_loaded_base(grpo_recipe):
    from tunesmith.methods import build_method
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.stages import build_stage
    from tunesmith.stages.grpo import left_pad, token_logps
    from tunesmith.training.speed import SpeedSetup

    recipe = grpo_recipe()
    model, tokenizer = load_model_and_tokenizer(recipe.model, Path("."))
    stage = build_stage(recipe.stage)
    data = stage.encode_data(recipe.data, tokenizer, 0, Path("."))
    model = build_method(recipe.method).apply(stage.adapt_model(model))
    stage.after_method(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)  # the adapter now changes the outputs
    objective = stage.objective(SpeedSetup(None, None, False, None))
    batch = objective.collate(data.train[:2], tokenizer.pad_token_id)
    rolled = objective.rollout(model, batch, data.train[:2], 0)
    base, _ = load_model_and_tokenizer(recipe.model, Path("."))
    args = (rolled["prompt_ids"], rolled["prompt_mask"], rolled["completion_ids"], rolled["completion_mask"], 1.0)
    with torch.no_grad():
        expected, policy = token_logps(base, *args), token_logps(model, *args)
    mask = rolled["completion_mask"].bool()
    assert objective.reference.copy is None  # no frozen copy: PEFT switches its adapter off instead
    torch.testing.assert_close(rolled["ref_logps"][mask], expected[mask], rtol=1e-5, atol=1e-5)
    assert (policy[mask] - expected[mask]).abs().max() > 1e-2
    assert left_pad([(1, 2), (3,)], 0)[0].tolist() == [[1, 2], [0, 3]]


def test_full_fine_tuning_keeps_a_frozen_copy_as_reference(grpo_recipe):
    finetune_recipe = grpo_recipe("method={kind: full}")
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.stages import build_stage

    model, tokenizer = load_model_and_tokenizer(finetune_recipe.model, Path("."))
    stage = build_stage(finetune_recipe.stage)
    stage.encode_data(finetune_recipe.data, tokenizer, 0, Path("."))
    stage.after_method(stage.adapt_model(model))
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # training moves the model, not its reference
    reference = dict(stage.reference.copy.named_parameters())
    name, moved = next(model.named_parameters())
    assert not reference[name].requires_grad and not torch.equal(reference[name], moved)


def test_recipe_without_rewards_is_a_schema_error(tiny_llama, prompts):
    with pytest.raises(TunesmithError, match="stage.rewards"):
        validate_recipe({"model": {"name": tiny_llama}, "data": {"train": str(prompts)}, "stage": "grpo"})
    with pytest.raises(TunesmithError, match="stage.rewards"):
        validate_recipe({"model": {"name": tiny_llama}, "data": {"train": str(prompts)},
                         "stage": {"kind": "grpo", "rewards": []}})


def test_bad_reward_functions_name_the_function_and_prompt(grpo_recipe, tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def broken(completions, **kwargs):\n    raise ValueError('no score today')\n"
        "def wordy(prompts, completions):\n    return ['high' for _ in completions]\n"
        "def short(completions, references):\n    return [float(len(c) < 5) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for function, message in (("broken", r"reward 'my_rewards:broken' raised ValueError: no score today.*Once upon"),
                              ("wordy", r"reward 'w' returned 'high', not a finite number.*Once upon")):
        recipe = grpo_recipe("train.max_steps=1", output=function, rewards=[
            {"kind": "function", "function": f"my_rewards:{function}", **({"name": "w"} if function == "wordy" else {})}])
        with pytest.raises(TunesmithError, match=message):
            finetune(recipe, progress=False)
    with pytest.raises(TunesmithError, match="has no function 'missing'"):
        finetune(grpo_recipe(output="missing", rewards=[{"kind": "function", "function": "my_rewards:missing"}]),
                 progress=False)


def test_reference_rewards_need_references(grpo_recipe, tmp_path):
    path = tmp_path / "no_answers.jsonl"
    path.write_text(json.dumps({"prompt": "Once upon a time"}) + "\n")
    with pytest.raises(TunesmithError, match=r"no_answers.jsonl, line 1: no reference answer"):
        finetune(grpo_recipe(f"data.train={path}", rewards=[{"kind": "exact_match"}]), progress=False)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_num_iterations_reuses_the_rollouts_and_equals_trl_loss(grpo_recipe, loss_type):
    """mu = 2: the second update trains on the same rollouts against the sampling policy's log-probabilities,
    its ratio leaves [1 - eps, 1 + eps] (clipping acts), and loss and gradient equal TRL's ``_compute_loss``."""
    pytest.importorskip("trl")
    from tunesmith.methods import build_method
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.stages import build_stage
    from tunesmith.stages.grpo import token_logps
    from tunesmith.training.speed import SpeedSetup

    from test_grpo_loss import trl_grpo_loss

    recipe = grpo_recipe(num_iterations=2, epsilon=0.02, loss_type=loss_type)
    model, tokenizer = load_model_and_tokenizer(recipe.model, Path("."))
    stage = build_stage(recipe.stage)
    data = stage.encode_data(recipe.data, tokenizer, 0, Path("."))
    model = build_method(recipe.method).apply(stage.adapt_model(model))
    stage.after_method(model)
    objective = stage.objective(SpeedSetup(None, None, False, None))
    assert objective.updates_per_batch == 2
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    torch.manual_seed(0)
    examples = data.train[:2]
    rolled = []
    for step in range(3):
        batch = objective.rollout(model, objective.collate(examples, tokenizer.pad_token_id), examples, step)
        rolled.append(batch)
        mask = batch["completion_mask"]
        if step % 2 == 0:  # the random model's completions all run to max_new_tokens: equal rewards; give it some
            batch["advantages"] = torch.linspace(-1.0, 1.0, len(batch["advantages"]))  # (kept for the reuse)
        summed = objective.loss_sum(model, batch)
        ours = summed / objective.units(batch)
        logps = token_logps(model, batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], mask, 1.0)
        expected = trl_grpo_loss(loss_type, logps, batch["old_logps"], batch["ref_logps"], mask, batch["advantages"],
                                 beta=0.04, epsilon=0.02, epsilon_high=0.02, max_new=16)
        assert float(ours) == pytest.approx(float(expected), rel=1e-5)
        for got, want in zip(torch.autograd.grad(ours, trainable, retain_graph=True),
                             torch.autograd.grad(expected, trainable)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        if step == 1:  # the reused rollouts, now off-policy: the ratio moved beyond the clipping range
            ratio = torch.exp(logps.detach() - batch["old_logps"])[mask.bool()]
            assert ((ratio - 1).abs() > 0.02).any()
        optimizer.zero_grad()
        ours.backward()
        optimizer.step()
    assert rolled[1] is rolled[0] and rolled[2] is not rolled[0]  # sampled once per two updates
    torch.testing.assert_close(rolled[0]["old_logps"], rolled[1]["old_logps"])
    step_record = objective.step_metrics()
    assert step_record["kl"] >= 0 and step_record["generate_s"] > 0


@pytest.mark.slow
def test_rloo_logs_kl_in_every_step_and_num_iterations_repeats_the_prompts(grpo_recipe, tmp_path):
    finetune(grpo_recipe("train.max_steps=4", "train.batch_size=2", group_size=4, max_new_tokens=8,
                         estimator="rloo", num_iterations=2), progress=False)
    logged = records(tmp_path / "run")
    assert len(logged) == 4 and all("kl" in r for r in logged)
    assert logged[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is still the reference
    assert logged[1]["generate_s"] == 0 and logged[2]["generate_s"] > 0  # rollouts reused, then sampled anew
    assert "samples" not in logged[1]  # samples are shown when they are drawn
    assert logged[1]["epoch"] == round(2 / (2 * 32 // 2), 4)  # 32 prompts, 2 a step, each batch trained on twice
