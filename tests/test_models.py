"""Model resolution: aliases, local folders, clear sentences for what cannot be loaded."""

import pytest

from tunesmith.config import ModelSection
from tunesmith.core.errors import TunesmithError
from tunesmith.models import ALIASES, load_model, resolve_model_path

from conftest import run_cli


def test_unknown_alias_is_one_sentence_with_a_hint(tmp_path):
    with pytest.raises(TunesmithError, match=r"unknown model alias 'smollm2-135m'\. Did you mean 'smollm2-135m-instruct'\?"):
        resolve_model_path("smollm2-135m", tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TunesmithError, match="has no weights"):
        resolve_model_path(str(tmp_path), tmp_path)


def test_local_folder_loads_with_the_recipe_dtype(tiny_llama, tmp_path):
    import torch

    assert resolve_model_path(tiny_llama, tmp_path) == tiny_llama
    model = load_model(tiny_llama, ModelSection(name=tiny_llama, dtype="bfloat16"))
    assert next(model.parameters()).dtype == torch.bfloat16


def test_hub_ids_pass_through_unchanged(tmp_path):
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_cli_errors_are_sentences_not_tracebacks(tmp_path, cli):
    """generate's refusal in a real process (its standard error holds nothing but progress lines and the
    sentence); the listing in this process (``cli``)."""
    result = run_cli("generate", "--model", "no-such-alias", "--prompt", "hi")
    *progress, error = result.stderr.splitlines()  # progress lines first (loading ...), then the one sentence
    assert result.returncode == 2 and error.startswith("error: unknown model alias")
    assert all(line.endswith("...") for line in progress)
    assert "Traceback" not in result.stderr
    listing = cli("models")
    assert listing.returncode == 0 and all(name in listing.stdout for name in ALIASES)


@pytest.mark.parametrize("name", ["smollm2-1.7b", "qwen2.5-3b", "llama-3.1-8b"])
def test_published_shapes_build_on_meta_with_their_parameter_count(name: str) -> None:
    from tunesmith.models.shapes import SHAPES, build_random_model, shape_config

    model = build_random_model(shape_config(name), "meta")
    assert sum(p.numel() for p in model.parameters()) == SHAPES.get(name).parameters
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_shape_from_a_model_folder(tiny_llama: str) -> None:
    import torch

    from tunesmith.models.shapes import build_random_model, shape_config

    model = build_random_model(shape_config(tiny_llama), "cpu", torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 292_800
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("kind", ["linear", "dynamic", "yarn"])
def test_rope_scaling_reaches_the_model_config(tiny_llama: str, kind: str) -> None:
    import torch

    from tunesmith.config import ModelSection
    from tunesmith.models import load_model

    plain = load_model(tiny_llama, ModelSection(name=tiny_llama))
    scaled = load_model(tiny_llama, ModelSection(name=tiny_llama, rope_scaling={"kind": kind, "factor": 4.0}))
    rotary = scaled.model.rotary_emb
    assert scaled.config.rope_parameters["rope_type"] == kind and scaled.config.rope_parameters["factor"] == 4.0
    assert rotary.rope_type == kind
    ids = (torch.arange(600) % 500 + 3).unsqueeze(0)  # past the 512 trained positions, where dynamic starts scaling
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, scaled(ids).logits)
    if kind == "linear":
        assert torch.allclose(rotary.inv_freq, plain.model.rotary_emb.inv_freq / 4.0)


def test_rope_scaling_is_checked_in_the_recipe() -> None:
    from pydantic import ValidationError

    from tunesmith.config import ModelSection

    with pytest.raises(ValidationError):
        ModelSection(rope_scaling={"kind": "ntk", "factor": 2.0})
    with pytest.raises(ValidationError):
        ModelSection(rope_scaling={"kind": "linear", "factor": 0.5})
