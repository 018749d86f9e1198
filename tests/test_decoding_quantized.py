"""Int8 and int4 weight-only decoding (inference.quantized) against a float reference of the same weights.

The reference is plain float32 maths: each layer's weight dequantised (int8: ``q * scale``; int4:
``(q - 8) * scale + zero`` per group of 32 columns, computed here from :func:`int4_grid`, not by the kernel)
and multiplied with ``F.linear``. The kernels take bfloat16 activations and return bfloat16, so products
agree to bfloat16's precision (about 3 significant digits), not bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch

from test_bad_input import Case, check_refusal, run_main
from test_decoding import prompts, random_model, with_lora
from tunesmith.core.errors import TunesmithError
from tunesmith.inference import quantized
from tunesmith.inference.decoding import Row, RowBatch, decode
from tunesmith.inference.quantized import (
    GROUP,
    HEADS,
    LAYERS,
    Int4Linear,
    Int8Linear,
    RescoredHead,
    check_quantize,
    int4_grid,
    quantized_twin,
)

KINDS = list(LAYERS)


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


def test_int4_grid_golden_numbers():
    # one group of 32 columns 0, 1, ..., 31: scale 31/15 = 2.0667 is 2.0625 in bfloat16, zero 0 + 8 * 2.0625 = 16.5,
    # q = round((w - 16.5) / 2.0625 + 8) = round(w / 2.0625)
    q, scale, zero = int4_grid(torch.arange(32.0)[None])
    assert float(scale) == 2.0625 and float(zero) == 16.5
    assert q[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13,
                             14, 14, 15, 15]
    # weights already on a 4-bit grid (a Q4_1-like group: w = d * q + m) come back exactly, up to bfloat16
    d, m = 0.0625, -0.5  # both exact in bfloat16
    grid = torch.tensor([float(k % 16) for k in range(64)]).reshape(2, 32)
    q, scale, zero = int4_grid(d * grid + m)
    assert torch.equal(q, grid.int()) and (scale.float() == d).all() and (zero.float() == m + 8 * d).all()


def test_int4_linear_is_the_dequantised_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 48)  # three groups of 32 columns, three blocks of 16 rows
    layer = Int4Linear.from_linear(linear)
    q, scale, zero = int4_grid(linear.weight)
    reference_weight = ((q.float().reshape(48, 3, GROUP) - 8) * scale.float()[..., None]
                        + zero.float()[..., None]).reshape(48, 96)
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == 48 * 96 // 2  # two weights a byte
    assert torch.equal(layer.dequantized(), reference_weight)  # the packing holds what int4_grid made
    # asymmetric rounding in groups: no weight moves by more than half a step (plus bfloat16's rounding)
    step = scale.float().repeat_interleave(GROUP, dim=1)
    assert ((reference_weight - linear.weight).abs() <= 0.5 * step + 0.01 * linear.weight.abs().amax()).all()
    x = torch.randn(3, 5, 96)
    reference = torch.nn.functional.linear(x.bfloat16().float(), reference_weight, linear.bias)
    got = layer(x)
    assert got.shape == (3, 5, 48) and got.dtype == torch.float32
    torch.testing.assert_close(got, reference, rtol=1e-2, atol=1e-2 * float(reference.abs().max()))


@pytest.mark.parametrize("shape, fits", [((96, 48), True), ((64, 512), True), ((64, 172), False), ((172, 64), False),
                                          ((48, 48), False), ((32, 40), False), ((32, 16), True)])
def test_int4_fits_exactly_the_shapes_the_kernel_takes(shape, fits):
    linear = torch.nn.Linear(*shape)
    assert Int4Linear.fits(linear) is fits
    if fits:
        Int4Linear.from_linear(linear)(torch.randn(2, shape[0]))
    elif shape[0] % GROUP == 0:  # whole groups, but rows the packing refuses: what fits() keeps float
        with pytest.raises(RuntimeError, match="dividable by 16"):
            Int4Linear.from_linear(linear)


def dequantised_reference(model, kind):
    """A float copy of ``model`` whose linear weights are what its quantised twin multiplies by."""
    twin, reference = quantized_twin(model, kind), copy.deepcopy(model)
    layers = dict(twin.named_modules())
    for name, module in reference.named_modules():
        if isinstance(layers.get(name), (Int8Linear, Int4Linear)):
            module.weight = torch.nn.Parameter(layers[name].dequantized())  # unties the LM head from the embedding
    return reference


@pytest.mark.parametrize("kind", KINDS)
def test_twin_logits_match_the_dequantised_float_model(kind):
    model = random_model("llama")
    twin, reference = quantized_twin(model, kind), dequantised_reference(model, kind)
    assert sum(isinstance(module, LAYERS[kind]) for module in twin.model.modules()) == 2 * 7  # 2 layers' 7
    assert type(twin.lm_head) is RescoredHead and type(twin.lm_head.quantized) is HEADS.get(kind, LAYERS[kind])
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


@pytest.mark.parametrize("kind", KINDS)
def test_the_head_computes_its_highest_logits_again_in_float(kind):
    """The quantised head's output is rounded to bfloat16; its top logits per row are the float head's, exactly."""
    model = random_model("llama")
    twin = quantized_twin(model, kind)
    hidden = torch.randn(3, 5, model.config.hidden_size) * 4
    with torch.no_grad():
        got = twin.lm_head(hidden)
        rounded = twin.lm_head.quantized(hidden).float()
    exact = torch.nn.functional.linear(hidden, model.lm_head.weight)  # float32, the shared weight
    chosen = rounded.topk(quantized.RESCORED, dim=-1).indices
    torch.testing.assert_close(got.gather(-1, chosen), exact.gather(-1, chosen), rtol=1e-6, atol=1e-5)
    assert (rounded.gather(-1, chosen) - exact.gather(-1, chosen)).abs().max() > 1e-4  # what it mends
    others = torch.ones_like(got, dtype=torch.bool).scatter(-1, chosen, False)
    assert torch.equal(got[others], rounded[others])  # the rest keep the quantised product's
    assert twin.lm_head.float_weight is model.lm_head.weight  # shared, not copied


def test_twins_are_kept_per_kind_and_made_again_after_an_in_place_change():
    model = random_model("llama")
    twin, int4 = quantized_twin(model, "int8"), quantized_twin(model, "int4")
    assert quantized_twin(model, "int8") is twin and quantized_twin(model, "int4") is int4 and int4 is not twin
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # as an optimizer step would
    remade = quantized_twin(model, "int8")
    assert remade is not twin
    torch.testing.assert_close(remade.model.layers[0].mlp.up_proj.dequantized(),
                               model.model.layers[0].mlp.up_proj.weight, rtol=0, atol=0.02)
    assert quantized_twin(model, "int4") is not int4


def test_greedy_int8_tokens_equal_float32_on_a_trained_model(stories260k):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(stories260k).eval()
    tokenizer = AutoTokenizer.from_pretrained(stories260k)
    prompt = tokenizer("Once upon a time, there was a little girl named Lily.")["input_ids"]
    float32 = decode(model, [prompt], 24)
    assert tokenizer.decode(float32[0]).startswith("She loved to play outside in the park.")
    twin = quantized_twin(model, "int8")
    kinds = {name: type(module).__name__ for name, module in twin.model.layers[0].named_modules() if "proj" in name}
    assert kinds["mlp.down_proj"] == "Linear" and kinds["mlp.up_proj"] == "Int8Linear"  # 172 wide: not a block of 16
    assert decode(model, [prompt], 24, quantize="int8") == float32
    int4 = quantized_twin(model, "int4")
    kinds = {name: type(module).__name__ for name, module in int4.model.layers[0].named_modules() if "proj" in name}
    assert kinds == {"self_attn.q_proj": "Int4Linear", "self_attn.k_proj": "Int4Linear", "self_attn.v_proj": "Int4Linear",
                     "self_attn.o_proj": "Int4Linear", "mlp.gate_proj": "Linear", "mlp.up_proj": "Linear",
                     "mlp.down_proj": "Linear"}  # 172 rows are not blocks of 16, 172 columns not groups of 32
    assert type(int4.lm_head.quantized) is Int8Linear
    assert tokenizer.decode(decode(model, [prompt], 24, quantize="int4")[0]).startswith("She loved to play")


@pytest.mark.parametrize("kind", KINDS)
def test_lora_keeps_its_adapter_in_float_on_quantised_base_layers(kind):
    model = with_lora(random_model("llama"))
    twin = quantized_twin(model, kind)
    kinds = {name.rsplit(".", 1)[-1]: type(module) for name, module in twin.named_modules()}
    assert kinds["base_layer"] is LAYERS[kind] and kinds["default"] is torch.nn.Linear  # lora_A/B.default stay float
    assert type(twin.get_base_model().lm_head.quantized) is HEADS.get(kind, LAYERS[kind])
    ids = torch.tensor([prompts(1, seed=8)[0]])
    reference = dequantised_reference(model, kind)
    with torch.no_grad():
        got, expected = twin(input_ids=ids).logits, reference(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))


def test_refusals_are_one_sentence(capsys, tmp_path, monkeypatch):
    with pytest.raises(TunesmithError, match="--quantize int3 is not known: use int8 or int4"):
        check_quantize(None, "int3")
    model = random_model("llama")
    model.config.quantization_config = {"load_in_4bit": True}  # how transformers marks a bitsandbytes load
    for kind in KINDS:
        with pytest.raises(TunesmithError, match=f"--quantize {kind} needs float weights.*already quantised"):
            decode(model, prompts(1), 4, quantize=kind)
    case = Case("generate --quantize int3", lambda t: ["generate", "--prompt", "hi", "--quantize", "int3"],
                ("--quantize int3 is not known", "int8 or int4"))
    code, output = run_main(case.argv(tmp_path), capsys)
    check_refusal(case, code, output, tmp_path)


def test_a_torch_without_the_int4_kernel_is_refused_in_one_sentence(capsys, tmp_path, monkeypatch):
    quantized.kernel_missing.cache_clear()
    monkeypatch.setattr(Int4Linear, "kernel", "_weight_int4pack_mm_removed")  # as a torch build lacking the op
    try:
        with pytest.raises(TunesmithError, match=r"--quantize int4 cannot run here: torch .* has no "
                                                 r"torch._weight_int4pack_mm_removed; use --quantize int8 or leave it out"):
            decode(random_model("llama"), prompts(1), 4, quantize="int4")
        case = Case("generate --quantize int4 without its kernel",
                    lambda t: ["generate", "--prompt", "hi", "--quantize", "int4"], ("cannot run here", "int8"))
        code, output = run_main(case.argv(tmp_path), capsys)
        check_refusal(case, code, output, tmp_path)
    finally:
        quantized.kernel_missing.cache_clear()


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_quantized_decoding_composes_with_the_compiled_step(kind):
    from tunesmith.inference.compiled import ATTRIBUTE

    model, prompt = random_model("llama", seed=2), prompts(1, seed=4)[0]
    lean = decode(model, [prompt], 16, quantize=kind)
    assert decode(model, [prompt], 16, quantize=kind, compile=True) == lean
    step = getattr(quantized_twin(model, kind), ATTRIBUTE)  # the twin's own compiled step; the float model has none
    assert not step.failed and step.compile_seconds > 0 and getattr(model, ATTRIBUTE, None) is None


@pytest.mark.parametrize("kind", KINDS)
def test_generate_command_with_quantize_prints_the_quantised_reply(tiny_llama, kind, cli):
    """The command in this process (``cli``; a subprocess cost about 6 s of imports): the subject is its reply."""
    from tunesmith.inference.generate import generate, load_for_inference

    printed = cli("generate", "--model", tiny_llama, "--prompt", "Once upon a time", "--max-new-tokens", "8",
                      "--quantize", kind)
    assert printed.returncode == 0, printed.stderr
    model, tokenizer = load_for_inference(tiny_llama)
    conversation = [{"role": "user", "content": "Once upon a time"}]
    assert printed.stdout.strip() == generate(model, tokenizer, [conversation], 8, quantize=kind)[0]
    assert generate(model, tokenizer, [conversation], 8, quantize=kind) != [""]
