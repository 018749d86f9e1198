"""The family matrix: every major open family trains, packs, generates with its own chat template and exports.

Tiny random models built from each family's own config class (``tests/family_support.py``), so the
matrix runs on a fresh clone with no download. docs/families.md records the matrix.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from family_support import FAMILIES, build_family
from tunesmith.data.encode import IGNORE_INDEX, EncodedExample
from tunesmith.training.batching import collate
from tunesmith.training.chunked_loss import model_inputs, plain_loss_sum
from tunesmith.training.packing import VARLEN_ATTENTION, enable_packed_attention, pack_collate

NAMES = list(FAMILIES)


@pytest.fixture(scope="module")
def family_models(tmp_path_factory):
    """Each family's folder, built on first use and kept for the module."""
    built: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in built:
            built[name] = build_family(name, tmp_path_factory.mktemp(name))
        return built[name]

    return get


@pytest.fixture(scope="module")
def trained_runs(family_models, tmp_path_factory, tiny_data_module):
    """Each family's LoRA run (2 steps on the tiny instruction data, packed where the family can), on first use."""
    from tunesmith.config import validate_recipe
    from tunesmith.finetune import finetune

    runs: dict[str, tuple[Path, dict]] = {}

    def get(name: str):
        if name not in runs:
            out = tmp_path_factory.mktemp(f"run-{name}") / "run"
            recipe = validate_recipe({
                "model": {"name": str(family_models(name))},
                "data": {"train": tiny_data_module, "max_length": 64, "template": "auto", "validation": "none"},
                "method": {"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "log_every": 1, "seed": 0,
                          "speed": {"autocast": "off"}},
                "output": {"dir": str(out)},
            })
            runs[name] = (out, finetune(recipe))
        return runs[name]

    return get


@pytest.fixture(scope="module")
def tiny_data_module() -> str:
    from conftest import TINY_DATA

    return str(TINY_DATA)


def make_examples(count: int, seed: int = 0) -> list[EncodedExample]:
    """Examples of 6 to 28 tokens (longer than the families' 8-token sliding windows), prompts masked."""
    generator = torch.Generator().manual_seed(seed)
    examples = []
    for index in range(count):
        length = 6 + (index * 7) % 23
        ids = torch.randint(30, 500, (length,), generator=generator).tolist()
        prompt = 1 + index % 4
        examples.append(EncodedExample(tuple(ids), tuple([IGNORE_INDEX] * prompt + ids[prompt:])))
    return examples


def per_example_losses(logits: torch.Tensor, labels: torch.Tensor, bounds: list[int]) -> list[float]:
    return [float(F.cross_entropy(logits[0, start:end - 1].float(), labels[0, start + 1:end],
                                  ignore_index=IGNORE_INDEX, reduction="sum"))
            for start, end in zip(bounds[:-1], bounds[1:])]


@pytest.mark.parametrize("name", NAMES)
def test_packed_per_example_losses_equal_unpacked(name: str, family_models) -> None:
    """Packing never lets an example see another: mind sliding windows (Mistral, Gemma), soft-capping (Gemma 2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(family_models(name)).train()
    examples = make_examples(5)
    with torch.no_grad():
        unpacked = [float(plain_loss_sum(model, collate([example], 0))) for example in examples]
    if model.config._attn_implementation == "eager":  # Gemma 2: sdpa cannot soft-cap attention logits
        assert FAMILIES[name].config.get("attn_logit_softcapping")
        assert not enable_packed_attention(model)  # so it keeps padded batches
        return
    assert enable_packed_attention(model)
    assert model.config._attn_implementation == VARLEN_ATTENTION
    packed = pack_collate(examples, 0)
    with torch.no_grad():
        logits = model(**model_inputs(packed), use_cache=False).logits
    losses = per_example_losses(logits, packed["labels"], packed["cu_seq_lens_q"].tolist())
    assert losses == pytest.approx(unpacked, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_each_family_trains_lora_and_generates_with_its_own_template(name: str, family_models, trained_runs) -> None:
    from tunesmith.data.encode import render_prompt
    from tunesmith.inference import generate, load_for_inference

    out, summary = trained_runs(name)
    model, tokenizer = load_for_inference(str(family_models(name)), adapter=str(out))
    template = (Path(__file__).parent / "data" / "templates" / f"{FAMILIES[name].template}.jinja").read_text()
    assert tokenizer.chat_template == template  # the family's own template, kept with the result
    conversation = [{"role": "user", "content": "Name a colour."}]
    prompt = render_prompt(tokenizer, conversation)
    assert "Name a colour." in prompt
    replies = generate(model, tokenizer, [conversation], max_new_tokens=8)
    assert len(replies) == 1 and isinstance(replies[0], str)
