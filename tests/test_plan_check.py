"""``tunesmith train``'s check before loading (plan/check.py), QLoRA's load peak, and random checkpoints by shard."""

import re
from pathlib import Path

import pytest

from tunesmith.core.errors import TunesmithError


def _shape_folder(folder: Path) -> Path:
    """A Llama config.json large enough that activations matter at long sequences (no weights: nothing loads)."""
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096).save_pretrained(folder)
    return folder


def _options(folder: Path, tokens: int, r: int = 4):
    from tunesmith.models.shapes import shape_config
    from tunesmith.workflows.plan.shapes import plan_shape

    return {o.label: o for o in plan_shape(shape_config(str(folder)), "tiny", tokens, r, 10**12).options}


def test_auto_checkpointing_turns_on_only_when_the_run_would_not_fit(tiny_recipe, tmp_path: Path) -> None:
    from tunesmith.workflows.plan.check import check_fits

    folder = _shape_folder(tmp_path / "shape")
    recipe = tiny_recipe("data.max_length=2048", "train.batch_size=4", "train.speed.activation_checkpointing=auto",
                         "model.dtype=bfloat16")
    options = _options(folder, 4 * 2048)
    plain, checkpointed = options["bf16 LoRA r=4"], options["bf16 LoRA r=4 + checkpointing"]
    assert checkpointed.peak(False) < plain.peak(False)
    roomy = check_fits(recipe, str(folder), 10**12, say=lambda line: None)
    assert roomy.train.speed.activation_checkpointing is False
    between = (plain.peak(False) + checkpointed.peak(False)) // 2
    said = []
    tight = check_fits(recipe, str(folder), between, say=said.append)
    assert tight.train.speed.activation_checkpointing is True
    assert said and "auto -> on" in said[0]
    assert recipe.train.speed.activation_checkpointing == "auto"  # the recipe itself is frozen, a copy is returned


def test_a_run_that_does_not_fit_is_refused_naming_the_cheapest_that_fits(tiny_recipe, tmp_path: Path) -> None:
    from tunesmith.config.loader import validate_method
    from tunesmith.workflows.plan.check import check_fits

    folder = _shape_folder(tmp_path / "shape")
    recipe = tiny_recipe("data.max_length=2048", "train.batch_size=4")
    recipe = recipe.model_copy(update={"method": validate_method({"kind": "full"})})
    options = _options(folder, 4 * 2048, r=16)  # a method without a rank is weighed against LoRA r=16
    room = options["full"].peak(False) - 1  # the recipe's own option does not fit
    fitting = [o for o in options.values() if o.peak(False) <= room]
    cheapest = min(fitting, key=lambda o: o.relative_cost)
    assert fitting and cheapest.kind == "lora"  # cheaper per step than full fine-tuning
    with pytest.raises(TunesmithError, match=r"with full needs about .* GB .* use " + re.escape(cheapest.label)
                       + r" \(method.kind: lora.*--no-plan-check"):
        check_fits(recipe, str(folder), room)
    assert check_fits(recipe, str(folder), room, refuse=False) is recipe  # --no-plan-check
    with pytest.raises(TunesmithError, match="nothing fits: lower train.batch_size or data.max_length"):
        check_fits(recipe, str(folder), 1)


def test_train_refuses_before_loading_and_no_plan_check_trains(tiny_recipe, monkeypatch, capsys) -> None:
    import yaml

    from tunesmith.cli import main
    from tunesmith.core import runtime

    recipe = tiny_recipe("train.max_steps=1")
    path = Path(recipe.output.dir).parent / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda device: 1)  # a machine with no memory left
    assert main(["train", str(path), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert "are available: nothing fits" in error and "--no-plan-check" in error and "Traceback" not in error
    assert not Path(recipe.output.dir).exists()  # refused before anything was loaded or written
    assert main(["train", str(path), "--no-progress", "--no-plan-check"]) == 0
    assert (Path(recipe.output.dir) / "summary.json").is_file()


def test_random_checkpoint_is_written_by_shard_and_loads_whole(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tunesmith.models.shapes import write_random_checkpoint

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)
    folder = write_random_checkpoint(config, tmp_path / "model", shard_bytes=60_000)
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and all(s.stat().st_size < 60_000 + 20_000 for s in shards)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.model.norm.weight, torch.ones(64, dtype=torch.bfloat16))
    assert float(model.model.layers[0].mlp.up_proj.weight.float().std()) == pytest.approx(0.02, rel=0.1)


def test_qlora_plan_counts_the_checkpoint_mapped_while_it_loads_and_trains() -> None:
    from transformers import LlamaConfig

    from tunesmith.models.shapes import build_random_model
    from tunesmith.workflows.plan.memory import ALLOCATOR_OVERHEAD
    from tunesmith.workflows.plan.shapes import plan_shape

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300)
    by = {o.label: o for o in plan_shape(config, "tiny", 64, 4, 10**12).options}
    qlora, lora = by["QLoRA nf4 r=4"], by["bf16 LoRA r=4"]
    assert lora.memory.load_peak == 0 and lora.resident_peak == lora.memory.total
    assert qlora.memory.checkpoint == 2 * qlora.total  # the bfloat16 checkpoint
    assert qlora.memory.load_peak == qlora.memory.process + int((2 * qlora.total + qlora.memory.weights)
                                                                * ALLOCATOR_OVERHEAD)
    # the checkpoint stays mapped while the steps run (measured at 1.7B and 3B, docs/plan.md)
    # and the bfloat16 weights left unquantised (embeddings, head, norms) stay views of it: counted once
    unquantised = sum(p.numel() for name, p in build_random_model(config, "meta").named_parameters()
                      if "proj" not in name)
    assert qlora.memory.mapped_weights == 2 * unquantised
    assert qlora.resident_peak == max(qlora.memory.total - int(2 * unquantised * ALLOCATOR_OVERHEAD)
                                      + qlora.memory.checkpoint, qlora.memory.load_peak)


def test_a_quantised_recipe_counts_its_checkpoint_files(tiny_recipe, tiny_llama: str) -> None:
    from tunesmith.methods import build_method
    from tunesmith.workflows.plan.memory import checkpoint_bytes

    files = sum(f.stat().st_size for f in Path(tiny_llama).glob("*.safetensors"))
    quantised = tiny_recipe("model.quantize=nf4")
    assert files > 0 and checkpoint_bytes(quantised, build_method(quantised.method)) == files
    plain = tiny_recipe()
    assert checkpoint_bytes(plain, build_method(plain.method)) == 0
