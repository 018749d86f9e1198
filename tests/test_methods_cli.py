"""``tunesmith methods``, ``tunesmith export`` and the example recipe per method."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tunesmith.config import load_recipe
from tunesmith.config.loader import validate_method
from tunesmith.methods import METHODS, build_method

from conftest import run_cli

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "methods"


def test_every_method_has_an_example_recipe_that_validates_and_names_its_command() -> None:
    recipes = sorted(EXAMPLES.rglob("*.yaml"))
    assert len(recipes) == 13
    kinds = set()
    for path in recipes:
        first_line = path.read_text().splitlines()[0]
        assert first_line == f"# tunesmith train examples/methods/{path.name}"
        recipe = load_recipe(path)
        kinds.add(recipe.method.kind)
        assert recipe.data.train == ("examples/data/tiny/train.jsonl",)  # the same task for every method
    assert kinds == set(METHODS.names())


def test_methods_command_lists_every_method_and_counts_parameters(tiny_llama: str, cli) -> None:
    result = cli("methods", "--model", tiny_llama)  # in this process: the subject is the table, not the process
    assert result.returncode == 0, result.stderr
    for kind in METHODS.names():
        assert re.search(rf"^{kind} ", result.stdout, re.MULTILINE), kind
    # prompt tuning's default: 20 virtual tokens of the tiny Llama's width (tiny_llama's shapes) 64, of 292,800 + 1,280 parameters
    assert "1,280 of 294,080 parameters train (0.435%)" in result.stdout


def _trained_result(method_settings: dict, tiny_llama: str, folder: Path) -> Path:
    """A result folder as a run writes it: the tiny Llama with a perturbed method applied."""
    from tunesmith.inference.generate import load_for_inference

    method = build_method(validate_method(method_settings))
    model, tokenizer = load_for_inference(tiny_llama)
    torch.manual_seed(0)  # the method's own initialisation (LoRA's A) too: the same folder every run
    model = method.apply(model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    folder.mkdir()
    method.save(model, folder)
    tokenizer.save_pretrained(folder)
    method.write_manifest(folder, base_model=tiny_llama, template="chatml")
    return folder


@pytest.mark.parametrize("settings", [{"kind": "lora", "r": 4}, {"kind": "ia3"}], ids=["lora", "ia3"])
def test_export_merges_and_the_plain_folder_reproduces_the_logits(settings: dict, tiny_llama: str,
                                                                 tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tunesmith.export import export_result
    from tunesmith.inference.generate import load_for_inference

    result = _trained_result(settings, tiny_llama, tmp_path / "adapter")
    report = export_result(result, tmp_path / "plain", merge=True)
    assert report.max_logit_difference < 1e-4
    trained, _ = load_for_inference(tiny_llama, str(result))
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    probe = torch.tensor([[1, 200, 300, 400, 17]])
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=probe).logits, trained(input_ids=probe).logits, rtol=0, atol=1e-4)
        assert not torch.allclose(plain(input_ids=probe).logits, base(input_ids=probe).logits, atol=1e-3)
    assert not (tmp_path / "plain" / "adapter_config.json").exists()


def test_export_of_an_unmergeable_method_says_why(tiny_llama: str, tmp_path: Path) -> None:
    from tunesmith.export import export_result
    from tunesmith.methods import NotMergeable

    result = _trained_result({"kind": "prefix", "virtual_tokens": 4}, tiny_llama, tmp_path / "adapter")
    with pytest.raises(NotMergeable, match="^prefix tuning adds keys and values"):
        export_result(result, tmp_path / "plain", merge=True)
    assert not (tmp_path / "plain").exists()


def test_export_of_an_adapter_without_merge_asks_for_it(tiny_llama: str, tmp_path: Path) -> None:
    from tunesmith.core.errors import TunesmithError
    from tunesmith.export import export_result

    result = _trained_result({"kind": "lora", "r": 4}, tiny_llama, tmp_path / "adapter")
    with pytest.raises(TunesmithError, match="add --merge"):
        export_result(result, tmp_path / "plain", merge=False)


def test_export_command_writes_a_folder_that_reloads_with_the_trained_outputs(tiny_llama: str, tmp_path: Path,
                                                                              cli) -> None:
    """``tunesmith export`` as a user runs it: a LoRA result merged, reloaded by plain transformers,
    gives the trained model's logits and greedy text; a second export into the same folder is refused
    (the refusals in this process: their subject is the sentence and the exit status, not the process)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunesmith.inference.generate import generate, load_for_inference

    result = _trained_result({"kind": "lora", "r": 4}, tiny_llama, tmp_path / "adapter")
    out = tmp_path / "plain"
    done = run_cli("export", "--adapter", str(result), "--out", str(out), "--merge")
    assert done.returncode == 0, done.stderr
    assert f"exported lora result as hf to {out}" in done.stdout
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()

    trained, trained_tokenizer = load_for_inference(tiny_llama, str(result))
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    plain_tokenizer = AutoTokenizer.from_pretrained(out)
    assert plain_tokenizer.chat_template == trained_tokenizer.chat_template  # the training template travels
    assert plain.num_parameters() == AutoModelForCausalLM.from_pretrained(tiny_llama).num_parameters()
    probe = trained_tokenizer("Give three tips for staying healthy.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=probe).logits, trained(input_ids=probe).logits, rtol=0, atol=1e-4)
    conversation = [[{"role": "user", "content": "Name a colour."}]]
    assert generate(plain, plain_tokenizer, conversation, max_new_tokens=8) == generate(
        trained, trained_tokenizer, conversation, max_new_tokens=8)

    again = cli("export", "--adapter", str(result), "--out", str(out), "--merge")
    assert again.returncode == 2 and "is not empty" in again.stderr and "Traceback" not in again.stderr
    refused = cli("export", "--adapter", str(result), "--out", str(tmp_path / "other"))
    assert refused.returncode == 2 and "add --merge" in refused.stderr and not (tmp_path / "other").exists()


@pytest.mark.slow
@pytest.mark.heavy  # 13 SmolLM2 runs, about 16 minutes on two cores: python -m pytest -m heavy
@pytest.mark.parametrize("recipe", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_method_reduces_validation_loss_on_smollm2(recipe: str, tmp_path: Path) -> None:
    """SmolLM2-135M-Instruct, the example recipe at 30 steps: validation loss falls for every method."""
    import json

    from tunesmith.pipeline.finetune import finetune

    path = EXAMPLES / recipe
    overrides = [f"output.dir={tmp_path / 'run'}", "train.max_steps=30", "eval.every_steps=null",
                 f"data.train={REPO / 'examples/data/tiny/train.jsonl'}",
                 f"data.validation={REPO / 'examples/data/tiny/validation.jsonl'}"]
    summary_before = finetune(load_recipe(path, overrides + ["train.max_steps=1", "train.lr=1e-12"]),
                              progress=False)
    summary = finetune(load_recipe(path, overrides + ["output.overwrite=true"]), progress=False)
    assert summary["val_loss"] < summary_before["val_loss"], json.dumps(dict(summary))
