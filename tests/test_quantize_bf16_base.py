"""A frozen base held in bfloat16 is loaded in bfloat16 (no float32 copy of the model first).

Reference: the same run loading the base in float32 and casting it when training starts (the path it
replaced). Each frozen weight is rounded to bfloat16 once either way; the one difference is that peft builds
a LoRA layer's A and B in its base layer's dtype before making them float32, so over a bfloat16 base A's
random start is rounded to bfloat16 (8 bits of mantissa): the losses agree to 1e-3, the adapters closely.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tunesmith.config.loader import validate_recipe
from tunesmith.pipeline import finetune as finetune_module

REPO = Path(__file__).resolve().parents[1]


def _recipe(model: str, out: Path, method: dict | None = None, model_extra: dict | None = None, **speed):
    data = REPO / "examples" / "data" / "tiny"
    return validate_recipe({
        "model": {"name": model, **(model_extra or {})},
        "data": {"train": str(data / "train.jsonl"), "max_length": 64},
        "method": method or {"kind": "lora", "r": 4},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "device": "cpu", "log_every": 1,
                  "speed": {"autocast": "bfloat16", **speed}},
        "output": {"dir": str(out)},
    })


@pytest.mark.parametrize(("method", "model_extra", "speed", "loaded"), [
    ({"kind": "lora"}, {}, {}, "bfloat16"),
    ({"kind": "ia3"}, {}, {}, "bfloat16"),
    ({"kind": "lora"}, {}, {"autocast": "off"}, "float32"),  # no bfloat16 compute: the base stays float32
    ({"kind": "full"}, {}, {}, "float32"),  # trains the base weights: float32 for the optimizer
    ({"kind": "prompt"}, {}, {}, "float32"),  # prompt methods keep a float32 base (docs/quantization.md)
    ({"kind": "lora"}, {"dtype": "float16"}, {}, "float16"),  # the user's own choice is kept
])
def test_the_base_loads_in_the_dtype_the_run_holds_it_in(method, model_extra, speed, loaded, tmp_path: Path) -> None:
    recipe = _recipe("x", tmp_path, method, model_extra, **speed)
    assert finetune_module.load_section(recipe, torch.device("cpu")).dtype == loaded


def test_quantised_base_is_left_to_bitsandbytes(tmp_path: Path) -> None:
    recipe = _recipe("x", tmp_path, model_extra={"quantize": "nf4"})
    assert finetune_module.load_section(recipe, torch.device("cpu")) is recipe.model


@pytest.mark.slow
def test_lora_over_a_base_loaded_in_bfloat16_trains_as_over_one_cast_after_loading(
        tiny_llama: str, tmp_path: Path, monkeypatch) -> None:
    straight = tmp_path / "bf16-load"
    finetune_module.finetune(_recipe(tiny_llama, straight), progress=False)
    monkeypatch.setattr(finetune_module, "load_section", lambda recipe, device: recipe.model)  # the float32 load
    cast = tmp_path / "float32-load"
    finetune_module.finetune(_recipe(tiny_llama, cast), progress=False)
    got = load_file(straight / "adapter" / "adapter_model.safetensors")
    expected = load_file(cast / "adapter" / "adapter_model.safetensors")
    assert sorted(got) == sorted(expected) and len(got) == 70
    for name in expected:
        assert got[name].dtype == torch.float32  # the adapter trains in float32 either way
        # 5e-3: with the fused LoRA update (one bfloat16 rounding of A's and B's product under autocast, not
        # peft's three) A's rounded start moved one element of 256 by 2.5e-3 after three Adam steps of lr 1e-2 on
        # an AMX machine and by 3.2e-3 on a Zen 4 one (other kernels): Adam's first steps move an element by up to
        # lr whatever its gradient's size, so one whose gradient is near zero parts by a fraction of lr
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=5e-3)
    assert _losses(straight) == pytest.approx(_losses(cast), rel=1e-3)


def _losses(run: Path) -> list[float]:
    import json

    return [row["loss"] for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in row]
