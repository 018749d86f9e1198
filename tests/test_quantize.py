"""A quantised frozen base (model.quantize: nf4 / int8, QLoRA) against bitsandbytes' own dequantised weights.

The reference: the same tiny Llama loaded in float32 with each quantised layer's weight replaced by what
bitsandbytes dequantises it to. With compute dtype float32 an nf4 layer is exactly that matrix product, so
logits, losses and LoRA gradients must agree to the last bit; anything else is a wrong layer or a wrong kernel.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tests.conftest import StartedAt

from tunesmith.config import ModelSection
from tunesmith.config.loader import validate_recipe
from tunesmith.methods import count_parameters
from tunesmith.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]


def _recipe(model: str, out: Path, method: str = "lora", quantize: str = "nf4", **train):
    data = REPO / "examples" / "data" / "tiny"
    return validate_recipe({
        "model": {"name": model, "quantize": quantize},
        "data": {"train": str(data / "train.jsonl"), "max_length": 64},
        "method": {"kind": method} if method != "lora" else {"kind": "lora", "r": 4},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "checkpoint_every": 2, "keep_checkpoints": 2,
                  "device": "cpu", "log_every": 1, **train},
        "output": {"dir": str(out)},
    })


@pytest.mark.parametrize("method", ["full", "partial"])
def test_quantised_base_is_refused_for_methods_that_train_the_base(method: str, tmp_path: Path) -> None:
    from tunesmith.core.errors import TunesmithError

    with pytest.raises((TunesmithError, ValueError), match="trains the base weights; use method lora"):
        _recipe("x", tmp_path, method=method)


def _dequantised_reference(quantised, path: str):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    replaced = 0
    for name, module in quantised.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            reference.get_submodule(name).weight.data = weight.float()
            replaced += 1
    return reference, replaced


def _with_lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    wrapped = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    for name, parameter in sorted(wrapped.named_parameters()):
        if "lora_B" in name:  # B starts at zero; give it values so that every gradient is non-trivial
            parameter.data.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return wrapped


def test_nf4_forward_and_lora_gradients_equal_the_dequantised_reference(tiny_llama: str) -> None:
    pytest.importorskip("bitsandbytes")
    quantised = load_model(tiny_llama, ModelSection(name=tiny_llama, quantize="nf4", compute_dtype="float32"))
    reference, replaced = _dequantised_reference(quantised, tiny_llama)
    assert replaced == 35  # 5 blocks x 7 projections; embeddings, norms and head stay float32
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # eval without gradients first: bitsandbytes would repack its weights here
        torch.testing.assert_close(quantised(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)
    quantised, reference = _with_lora(quantised), _with_lora(reference)
    losses, grads = [], []
    for model in (quantised, reference):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(float(loss))
        grads.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert losses[0] == losses[1]
    assert sorted(grads[0]) == sorted(grads[1]) and len(grads[0]) == 70
    for name, grad in grads[1].items():
        torch.testing.assert_close(grads[0][name], grad, rtol=1e-6, atol=1e-9, msg=name)


def test_nf4_weights_are_four_bit_and_counted_as_the_weights_they_stand_for(tiny_llama: str) -> None:
    pytest.importorskip("bitsandbytes")
    plain = load_model(tiny_llama, ModelSection(name=tiny_llama))
    quantised = load_model(tiny_llama, ModelSection(name=tiny_llama, quantize="nf4"))
    assert count_parameters(quantised)[1] == count_parameters(plain)[1] == 292_800
    assert quantised.get_memory_footprint() < 0.6 * plain.get_memory_footprint()


@pytest.mark.slow
def test_qlora_trains_resumes_exactly_and_exports_a_checked_merged_model(tiny_llama: str, tmp_path: Path) -> None:
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from tunesmith.export import export
    from tunesmith.pipeline.finetune import finetune

    straight = tmp_path / "straight"
    summary = finetune(_recipe(tiny_llama, straight), progress=False)
    losses = [row["loss"] for row in map(__import__("json").loads, (straight / "metrics.jsonl").read_text().splitlines())
              if "loss" in row]
    assert summary is not None and losses and losses[-1] < losses[0]  # the adapter learns over the 4-bit base

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-00000004")
    for name in ("adapter", "summary.json", "metrics.jsonl"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    started = StartedAt()
    finetune(_recipe(tiny_llama, resumed), resume=True, extra_hooks=[started], progress=False)
    assert started.step == 2
    expected = load_file(straight / "checkpoints" / "step-00000004" / "trainable.safetensors")
    got = load_file(resumed / "checkpoints" / "step-00000004" / "trainable.safetensors")
    assert sorted(got) == sorted(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0)

    report = export(straight, tmp_path / "merged", "hf")  # merged onto the base's own weights, then checked
    assert report.checks  # export raises when a check fails
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {tensor.dtype for tensor in merged.values()} == {torch.float32}
    assert not any(key.endswith(("absmax", "quant_map", "quant_state.bitsandbytes__nf4")) for key in merged)


@pytest.mark.parametrize("kind", ["lora", "ia3", "adapter", "prefix", "prompt", "ptuning"])
def test_every_frozen_base_method_trains_over_an_nf4_base(kind: str, tiny_llama: str) -> None:
    pytest.importorskip("bitsandbytes")
    from tunesmith.config.loader import validate_method
    from tunesmith.methods import build_method

    model = build_method(validate_method({"kind": kind})).apply(
        load_model(tiny_llama, ModelSection(name=tiny_llama, quantize="nf4")))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]


def test_a_served_qlora_run_answers_as_generate_loads_it(tiny_llama: str, tmp_path: Path) -> None:
    """The server loads a QLoRA run over its base quantised and dequantised as in training (the manifest's
    ``quantized_base``), exactly as ``generate`` does, on a model of its own (not the shared float base)."""
    pytest.importorskip("bitsandbytes")
    from tunesmith.inference.generate import load_for_inference
    from tunesmith.pipeline.finetune import finetune
    from tunesmith.serve.pool import ModelPool
    from tunesmith.serve.workspace import Workspace

    workspace = Workspace(tmp_path / "workspace")
    finetune(_recipe(tiny_llama, workspace.root / "runs" / "qlora", max_steps=2, checkpoint_every=None), progress=False)
    pool = ModelPool(workspace, {"base": tiny_llama})
    served = pool.get("runs/qlora")
    reference, _ = load_for_inference(tiny_llama, str(workspace.root / "runs" / "qlora"))
    plain = pool.get("base").model
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad(), served.active():
        logits = served.model(input_ids=ids).logits
        torch.testing.assert_close(logits, reference(input_ids=ids).logits, rtol=0, atol=0)
        assert not torch.equal(logits, plain(input_ids=ids).logits)  # not the adapter on the checkpoint's weights
    assert served.model is not plain and list(pool.loaded) == [tiny_llama]
