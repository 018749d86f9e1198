"""LoftQ's start for LoRA over an nf4 base (method.init: loftq), and merging a QLoRA result into dequantised weights.

References: the float32 model itself (at full rank LoftQ must give it back), the Eckart-Young bound computed
here from each layer's singular values (at low rank LoftQ's start is the best rank-r correction), and
bitsandbytes' own dequantisation of the base (what a merged QLoRA export must be built on).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tunesmith.config import ModelSection
from tunesmith.config.loader import validate_method, validate_recipe
from tunesmith.methods import build_method
from tunesmith.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]


def _loftq_model(path: str, rank: int):
    quantised = load_model(path, ModelSection(name=path, quantize="nf4", compute_dtype="float32"))
    method = build_method(validate_method({"kind": "lora", "r": rank, "alpha": 2 * rank, "dropout": 0.0,
                                           "init": "loftq"}))
    return method.apply(quantised).eval()


def test_loftq_at_full_rank_gives_back_the_full_precision_model(tiny_llama: str) -> None:
    pytest.importorskip("bitsandbytes")
    full = load_model(tiny_llama, ModelSection(name=tiny_llama))
    plain_qlora = load_model(tiny_llama, ModelSection(name=tiny_llama, quantize="nf4", compute_dtype="float32"))
    loftq = _loftq_model(tiny_llama, rank=64)  # every matrix here has a side of at most 64: the correction is exact
    ids = torch.randint(3, 500, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference, rounded, corrected = (m(input_ids=ids).logits for m in (full, plain_qlora, loftq))
    assert (rounded - reference).abs().max() > 1e-3  # nf4 alone is visibly off
    torch.testing.assert_close(corrected, reference, rtol=0, atol=2e-4)


def test_loftq_at_low_rank_leaves_the_eckart_young_error(tiny_llama: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from peft.tuners.lora import LoraLayer

    from tunesmith.methods.loftq import loftq_initialise

    model = _loftq_model(tiny_llama, rank=4)
    full = load_model(tiny_llama, ModelSection(name=tiny_llama))
    before = best = achieved = 0.0
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer):
            continue
        base = module.get_base_layer().weight
        residual = full.get_submodule(name).weight - bnb.functional.dequantize_4bit(base.data, base.quant_state)
        singular = torch.linalg.svdvals(residual.detach())
        with torch.no_grad():
            update = module.scaling["default"] * module.lora_B["default"].weight @ module.lora_A["default"].weight
        before += float(singular.pow(2).sum())
        best += float(singular[4:].pow(2).sum())  # what no rank-4 matrix can remove
        achieved += float((residual - update).pow(2).sum())
    assert achieved == pytest.approx(best, rel=1e-3)
    assert (best / before) ** 0.5 < 0.95
    layers, left = loftq_initialise(model, tiny_llama)  # the same start again: idempotent, and what it reports
    assert layers == 35 and left == pytest.approx((best / before) ** 0.5, rel=1e-3)


def _recipe(model: str, out: Path, **method):
    data = REPO / "examples" / "data" / "tiny"
    return {
        "model": {"name": model, "quantize": "nf4"},
        "data": {"train": str(data / "train.jsonl"), "max_length": 64},
        "method": {"kind": "lora", "r": 4, "init": "loftq", **method},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "device": "cpu", "log_every": 1},
        "output": {"dir": str(out)},
    }


@pytest.mark.parametrize(("change", "message"), [
    ({"model": {"name": "x"}}, "method.init: loftq corrects the rounding error of an nf4 base, and model.quantize is none"),
    ({"model": {"name": "x", "quantize": "int8"}}, "model.quantize is int8; set model.quantize: nf4"),
    ({"method": {"kind": "lora", "init": "loftq", "dora": True}}, "drop method.dora or use method.init: default"),
    ({"method": {"kind": "lora", "init": "pissa"}}, "init"),
])
def test_loftq_bad_input_names_the_field_and_the_fix(change: dict, message: str, tmp_path: Path) -> None:
    from tunesmith.core.errors import TunesmithError

    with pytest.raises((TunesmithError, ValueError), match=message):
        validate_recipe({**_recipe("x", tmp_path), **change})


@pytest.mark.slow
def test_qlora_export_merges_into_the_dequantised_base(tiny_llama: str, tmp_path: Path) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    from tunesmith.export import export
    from tunesmith.pipeline.finetune import finetune

    run = tmp_path / "run"
    finetune(validate_recipe(_recipe(tiny_llama, run)), progress=False)
    manifest = json.loads((run / "adapter" / "tunesmith.json").read_text())
    assert manifest["quantized_base"] == {"quantize": "nf4", "dtype": "float32"}
    report = export(run, tmp_path / "merged", "hf")  # float32, export's dtype
    assert report.checks  # export raises when its reload check fails
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    quantised = load_model(tiny_llama, ModelSection(name=tiny_llama, quantize="nf4"))
    original = load_file(Path(tiny_llama) / "model.safetensors")
    scaling = json.loads((run / "adapter" / "adapter_config.json").read_text())["lora_alpha"] / 4
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.4.mlp.down_proj"):
        layer = quantised.get_submodule(name).weight
        rounded = bnb.functional.dequantize_4bit(layer.data, layer.quant_state).float()
        lora_a = adapter[f"base_model.model.{name}.lora_A.weight"].float()
        lora_b = adapter[f"base_model.model.{name}.lora_B.weight"].float()
        expected = rounded + scaling * lora_b @ lora_a
        got = merged[f"{name}.weight"].float()
        torch.testing.assert_close(got, expected.to(got.dtype).float(), rtol=0, atol=1e-6)
        # on the checkpoint's own weights the rounding error would count twice (LoftQ's B·A holds it)
        assert (original[f"{name}.weight"] + scaling * lora_b @ lora_a - expected).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_quantised_base_dequantises_into_the_dtype_asked(dtype: str, tiny_llama: str) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    from tunesmith.models.loading import load_dequantised

    quantised = load_model(tiny_llama, ModelSection(name=tiny_llama, quantize="nf4"))
    plain = load_dequantised(tiny_llama, ModelSection(name=tiny_llama, dtype=dtype),
                             {"quantize": "nf4", "dtype": "float32"})
    assert {p.dtype for p in plain.parameters()} == {getattr(torch, dtype)}
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    layer = quantised.get_submodule("model.layers.2.mlp.up_proj").weight
    rounded = bnb.functional.dequantize_4bit(layer.data, layer.quant_state)
    torch.testing.assert_close(plain.get_submodule("model.layers.2.mlp.up_proj").weight.data,
                               rounded.to(getattr(torch, dtype)), rtol=0, atol=0)
