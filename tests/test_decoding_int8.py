"""Int8 weight-only decoding (inference.quantized) against a float reference of the same int8 weights.

The reference is plain float32 maths: each layer's weight dequantised (``q * scale``) and multiplied with
``F.linear``. The kernel takes bfloat16 activations and returns bfloat16, so products agree to bfloat16's
precision (about 3 significant digits), not bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_bad_input import Case, check_refusal, run_main
from test_decoding import prompts, random_model, with_lora
from tunesmith.core.errors import TunesmithError
from tunesmith.inference.decoding import Row, RowBatch, decode
from tunesmith.inference.quantized import Int8Linear, check_quantize, int8_twin


def test_int8_linear_is_the_dequantised_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    layer = Int8Linear.from_linear(linear)
    assert layer.weight.dtype == torch.int8 and int(layer.weight.abs().max()) == 127  # every row's largest hits 127
    dequantised = layer.dequantized()  # (out, in) float32
    # per-channel symmetric rounding: no weight moves by more than half a step (plus bfloat16's rounding of the scale)
    step = layer.scale.float()[:, None]
    assert ((dequantised - linear.weight).abs() <= 0.5 * step + 0.004 * linear.weight.abs()).all()
    x = torch.randn(3, 5, 96)
    reference = torch.nn.functional.linear(x.bfloat16().float(), dequantised, linear.bias)
    got = layer(x)
    assert got.shape == (3, 5, 40) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-2, atol=1e-2 * float(reference.abs().max()))


def dequantised_reference(model):
    """A float copy of ``model`` whose linear weights are what its int8 twin multiplies by."""
    twin, reference = int8_twin(model), copy.deepcopy(model)
    layers = dict(twin.named_modules())
    for name, module in reference.named_modules():
        if isinstance(layers.get(name), Int8Linear):
            module.weight = torch.nn.Parameter(layers[name].dequantized())  # unties the LM head from the embedding
    return reference


def test_twin_logits_match_the_dequantised_float_model():
    model = random_model("llama")
    twin, reference = int8_twin(model), dequantised_reference(model)
    assert sum(isinstance(module, Int8Linear) for module in twin.modules()) == 2 * 7 + 1  # 2 layers' 7 + LM head
    assert twin.model.embed_tokens.weight is model.model.embed_tokens.weight  # shared, not copied
    assert all(type(module) is torch.nn.Linear for module in model.modules() if isinstance(module, torch.nn.Linear))
    ids = torch.tensor([prompts(1, seed=3)[0]])
    with torch.no_grad():
        got, expected = twin(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))
    # the lean decode step on the twin gives the twin's forward (its own products, not the float ones)
    batch = RowBatch(twin)
    batch.join([Row(ids[0].tolist())], room=4)
    assert batch.rows[0].tokens == [int(got[0, -1].argmax())]


def test_twin_is_kept_and_made_again_after_an_in_place_change():
    model = random_model("llama")
    twin = int8_twin(model)
    assert int8_twin(model) is twin
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # as an optimizer step would
    remade = int8_twin(model)
    assert remade is not twin
    torch.testing.assert_close(remade.model.layers[0].mlp.up_proj.dequantized(),
                               model.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0.02)


def test_greedy_int8_tokens_equal_float32_on_a_trained_model(stories260k):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    prompt = tokenizer("Once upon a time, there was a little girl named Lily.")["input_ids"]
    float32 = decode(model, [prompt], 24)
    assert tokenizer.decode(float32[0]).startswith("She loved to play outside in the park.")
    twin = int8_twin(model)
    kinds = {name: type(module).__name__ for name, module in twin.model.layers[0].named_modules() if "proj" in name}
    assert kinds["mlp.down_proj"] == "Linear" and kinds["mlp.up_proj"] == "Int8Linear"  # 172 wide: not a block of 16
    assert decode(model, [prompt], 24, quantize="int8") == float32


def test_lora_keeps_its_adapter_in_float_on_int8_base_layers():
    model = with_lora(random_model("llama"))
    twin = int8_twin(model)
    kinds = {name.rsplit(".", 1)[-1]: type(module) for name, module in twin.named_modules()}
    assert kinds["base_layer"] is Int8Linear and kinds["default"] is torch.nn.Linear  # lora_A/B.default stay float
    ids = torch.tensor([prompts(1, seed=8)[0]])
    reference = dequantised_reference(model)
    with torch.no_grad():
        got, expected = twin(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))


def test_refusals_are_one_sentence(capsys, tmp_path):
    with pytest.raises(TunesmithError, match="--quantize int4 is not known: use int8"):
        check_quantize(None, "int4")
    model = random_model("llama")
    model.config.quantization_config = {"load_in_4bit": True}  # how transformers marks a bitsandbytes load
    with pytest.raises(TunesmithError, match="already quantised"):
        decode(model, prompts(1), 4, quantize="int8")
    case = Case("generate --quantize int4", lambda t: ["generate", "--prompt", "hi", "--quantize", "int4"],
                ("--quantize int4 is not known", "int8"))
    code, output = run_main(case.argv(tmp_path), capsys)
    check_refusal(case, code, output, tmp_path)


@pytest.mark.slow
def test_int8_composes_with_the_compiled_step():
    from tunesmith.inference.compiled import ATTRIBUTE

    model, prompt = random_model("llama", seed=2), prompts(1, seed=4)[0]
    lean = decode(model, [prompt], 16, quantize="int8")
    assert decode(model, [prompt], 16, quantize="int8", compile=True) == lean
    step = getattr(int8_twin(model), ATTRIBUTE)  # the twin's own compiled step; the float model has none
    assert not step.failed and step.compile_seconds > 0 and getattr(model, ATTRIBUTE, None) is None


@pytest.mark.slow  # a subprocess: about 6 s
def test_generate_command_with_quantize_int8_prints_the_int8_reply(tiny_llama):
    from tunesmith.inference.generate import generate, load_for_inference

    from conftest import run_cli

    printed = run_cli("generate", "--model", tiny_llama, "--prompt", "Once upon a time", "--max-new-tokens", "8",
                      "--quantize", "int8")
    assert printed.returncode == 0, printed.stderr
    model, tokenizer = load_for_inference(tiny_llama)
    conversation = [{"role": "user", "content": "Once upon a time"}]
    assert printed.stdout.strip() == generate(model, tokenizer, [conversation], 8, quantize="int8")[0]
