"""``tunesmith plan``: parameter counts, memory against measured runs, the command's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config import validate_recipe

from conftest import REPO


@pytest.fixture(scope="module")
def plan_cache(tmp_path_factory) -> str:
    """One cache folder for this module's plans (the process footprint is measured once)."""
    return str(tmp_path_factory.mktemp("plan-cache"))


@pytest.fixture(autouse=True)
def _plan_cache(plan_cache, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", plan_cache)


def _recipe(tiny_llama: str, tmp_path: Path, method: dict, **speed) -> dict:
    return {"model": {"name": tiny_llama},
            "data": {"train": str(REPO / "examples/data/tiny/train.jsonl"), "max_length": 96, "template": "simple"},
            "method": method, "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "log_every": 1, "speed": speed},
            "output": {"dir": str(tmp_path / "run")}}


def test_meta_device_parameter_counts_equal_the_real_ones_for_every_method(tiny_llama: str) -> None:
    import copy

    from transformers import AutoModelForCausalLM

    from tunesmith.config.loader import validate_method
    from tunesmith.methods import METHODS, build_method, count_parameters
    from tunesmith.workflows.plan import meta_parameter_counts

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for kind in METHODS.names():
        section = validate_method({"kind": kind})
        real = count_parameters(build_method(section).apply(copy.deepcopy(model)))
        assert meta_parameter_counts(model.config, section) == real, kind


@pytest.mark.slow
@pytest.mark.parametrize("method", [{"kind": "lora", "r": 4, "alpha": 8}, {"kind": "full"}], ids=["lora", "full"])
def test_planned_peak_memory_is_within_20_percent_of_a_measured_run(tiny_llama: str, tmp_path: Path, method) -> None:
    from tunesmith.workflows.plan import plan_recipe

    # the calibration is a real run of the recipe in a fresh process: its peak memory is the measurement
    plan = plan_recipe(validate_recipe(_recipe(tiny_llama, tmp_path, method)), say=lambda *a: None)
    measured = plan.calibration["peak_memory_mb"] * 2**20
    estimate = plan.methods[0].memory.total
    assert abs(estimate - measured) / measured < 0.20, (estimate / 2**20, measured / 2**20)
    assert plan.methods[0].seconds_per_step > 0 and plan.methods[0].calibrated
    calibration = plan.calibration
    # packed, the cost of a step is its real tokens: the plan drew the very batches the run's sampler drew
    assert calibration["step_costs"] == calibration["step_tokens"]
    # each step's own time (the records' tokens are cumulative: tokens/tokens_per_s was k times step k's time)
    assert sum(calibration["step_seconds"]) <= calibration["train_seconds"]
    assert calibration["seconds_per_step"] == sorted(calibration["step_seconds"][1:])[1]  # median of steps 2-4
    # the run is more than its steps: start (load, data, save) and the first step's warm-up are counted
    assert plan.methods[0].run_seconds > plan.methods[0].seconds_per_step * plan.steps


def test_activations_follow_the_layout_and_checkpointing_saves_memory(tiny_llama: str, tmp_path: Path) -> None:
    from tunesmith.workflows.plan import plan_recipe

    def activations(**speed):
        raw = _recipe(tiny_llama, tmp_path, {"kind": "full"}, **speed)
        return plan_recipe(validate_recipe(raw), calibrate=False, say=lambda *a: None).methods[0].memory

    packed, padded = activations(packing=True), activations(packing=False)
    checkpointed = activations(packing=True, activation_checkpointing=True)
    assert checkpointed.activations < 0.6 * packed.activations
    assert padded.activations > packed.activations  # padding computes (and saves) pad positions too
    full_logits = activations(chunked_loss=False)
    assert full_logits.logits > packed.logits
    assert packed.gradients == 292_800 * 4 and packed.optimizer == 2 * 292_800 * 4


def test_plan_command_prints_json_for_every_method(tiny_llama: str, tmp_path: Path, capsys) -> None:
    import yaml

    from tunesmith.cli import main
    from tunesmith.methods import METHODS

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(_recipe(tiny_llama, tmp_path, {"kind": "lora", "r": 4})))
    assert main(["plan", str(recipe), "--methods", "all", "--no-calibration", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert sorted(m["kind"] for m in plan["methods"]) == sorted(METHODS.names())
    lora = next(m for m in plan["methods"] if m["kind"] == "lora")
    assert lora["trainable"] == 23_120 and lora["memory"]["total"] > lora["memory"]["process"]
    assert plan["data"]["examples"] == 240 and "examples" in plan["data"]["verdict"]
    assert plan["recommendation"] and len(plan["reasons"]) == len(METHODS.names())


def _tiny_shape():
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=300, max_position_embeddings=256)


def test_saved_bytes_from_cut_models_equal_the_whole_model() -> None:
    """The shape plan's activations, extrapolated from one- and two-block cuts, are what the whole model saves."""
    import torch

    from tunesmith.config.loader import validate_method
    from tunesmith.methods import build_method
    from tunesmith.models.shapes import build_random_model
    from tunesmith.workflows.plan.shapes import forward_saved_bytes, saved_bytes_per_token

    config = _tiny_shape()
    for section in (validate_method({"kind": "lora", "r": 4}), validate_method({"kind": "full"})):
        dtype = torch.float32 if section.kind == "full" else torch.bfloat16
        whole = build_method(section).apply(build_random_model(config, "cpu", dtype))
        per_token, blocks = saved_bytes_per_token(section, config, 64)
        assert blocks == 3 and per_token > 0
        assert per_token == pytest.approx(forward_saved_bytes(whole, 64) / 64, rel=0.02)


def test_measuring_saved_activations_keeps_no_model_alive() -> None:
    """What the shape plan builds to measure activations is freed after: a saved output holds its own graph (a cycle
    that Python's gc cannot see), which kept the plan check's cut models alive through a whole run (2 GB at 1.7B)."""
    import gc
    import weakref

    import torch

    from tunesmith.config.loader import validate_method
    from tunesmith.methods import build_method
    from tunesmith.models.shapes import build_random_model
    from tunesmith.workflows.plan.shapes import forward_saved_bytes

    model = build_method(validate_method({"kind": "full"})).apply(build_random_model(_tiny_shape(), "cpu", torch.float32))
    weight = weakref.ref(model.get_input_embeddings().weight)  # in the graph (the output head is not: body only)
    assert forward_saved_bytes(model, 32) > 0
    del model
    gc.collect()
    assert weight() is None


@pytest.mark.slow
def test_planning_a_recipe_keeps_no_model_alive(tiny_llama: str, tmp_path: Path) -> None:
    """As above, for the recipe plan's activations measured on a copy of the loaded model (plan/memory.py)."""
    import gc

    import torch

    from tunesmith.workflows.plan import plan_recipe

    def live_models() -> int:
        gc.collect()
        return sum(isinstance(o, torch.nn.Module) and type(o).__name__ == "LlamaForCausalLM" for o in gc.get_objects())

    before = live_models()
    plan_recipe(validate_recipe(_recipe(tiny_llama, tmp_path, {"kind": "full"})), calibrate=False, say=lambda *a: None)
    assert live_models() == before


def test_shape_plan_ranks_options_and_says_when_nothing_fits(capsys) -> None:
    from tunesmith.cli import main
    from tunesmith.workflows.plan.shapes import describe_shape, plan_shape

    plan = plan_shape(_tiny_shape(), "tiny", tokens=128, r=4, available=10**12)
    by = {o.label: o for o in plan.options}
    lora, qlora, full = by["bf16 LoRA r=4"], by["QLoRA nf4 r=4"], by["full"]
    assert qlora.memory.weights < lora.memory.weights < full.memory.weights
    assert by["bf16 LoRA r=4 + checkpointing"].memory.activations < lora.memory.activations
    assert full.trainable == full.total and lora.trainable < lora.total
    assert plan.choice("this machine") is lora  # everything fits: the cheapest is bf16 LoRA without checkpointing
    tight = plan_shape(_tiny_shape(), "tiny", tokens=128, r=4, available=1)
    assert tight.choice("this machine") is None
    assert "this machine (0.0 GB available): nothing fits" in describe_shape(tight)
    assert main(["plan", "--shape", "no-such-shape"]) == 2
    assert "--shape no-such-shape is neither a built-in shape" in capsys.readouterr().err
