"""Per-row LoRA (methods/lora_rows.py) against peft's mixed-batch forward (``adapter_names``), the reference.

A tiny random Llama with two adapters of different ranks, scalings and target modules, and base rows:
the logits of a mixed batch (a prefill of several tokens per row, float32) equal peft's to 1e-5; what
peft alone can serve (DoRA) is refused; outside a call the layers are peft's own again.
"""

from __future__ import annotations

import pytest
import torch

from test_decoding import random_model
from tunesmith.methods.lora_rows import RowLora


def two_adapters(dtype=torch.float32):
    from peft import LoraConfig, get_peft_model

    with torch.random.fork_rng():
        torch.manual_seed(3)
        model = get_peft_model(random_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                               adapter_name="a0")
        model.add_adapter("a1", LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: give each adapter an effect
                parameter.data.normal_(0, 0.1)
    return model.to(dtype).eval()


ADAPTERS = ["a0", "__base__", "a1", "a0", None, "a1"]


@torch.no_grad()
def test_a_mixed_batch_gives_peft_mixed_forward_logits():
    model = two_adapters()
    ids = torch.randint(3, 80, (len(ADAPTERS), 7), generator=torch.Generator().manual_seed(0))
    peft_names = [name or "__base__" for name in ADAPTERS]
    expected = model(input_ids=ids, adapter_names=peft_names).logits
    row_lora = RowLora(model)
    assert row_lora.supports(ADAPTERS)
    with row_lora.rows(ADAPTERS):
        got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])  # the adapters change the rows
    assert not torch.allclose(expected[0], expected[2])
    assert all("forward" not in layer.__dict__ for layer in row_lora._layers)  # peft's forward is back
    torch.testing.assert_close(model(input_ids=ids, adapter_names=peft_names).logits, expected, rtol=0, atol=0)


@torch.no_grad()
def test_a_bfloat16_base_is_as_close_to_float32_as_peft_mixed_forward():
    """The update is computed in the base's bfloat16 (peft: in the float32 adapters, then cast): its largest
    distance from the float32 logits (up to ~1) measured 0.87-1.16x peft's own (about 0.01) over 6 seeds."""
    model = two_adapters()
    ids = torch.randint(3, 80, (len(ADAPTERS), 5), generator=torch.Generator().manual_seed(1))
    names = [name or "__base__" for name in ADAPTERS]
    exact = model(input_ids=ids, adapter_names=names).logits
    for name, parameter in model.named_parameters():
        if "lora_" not in name:
            parameter.data = parameter.data.to(torch.bfloat16)  # peft keeps a bf16 base's adapters in float32
    peft_error = (model(input_ids=ids, adapter_names=names).logits.float() - exact).abs().max()
    with RowLora(model).rows(ADAPTERS):
        got = model(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    assert (got.float() - exact).abs().max() <= 1.5 * peft_error


def test_changed_adapter_weights_are_read_again():
    model = two_adapters()
    ids = torch.randint(3, 80, (len(ADAPTERS), 4), generator=torch.Generator().manual_seed(2))
    row_lora = RowLora(model)
    with torch.no_grad(), row_lora.rows(ADAPTERS):
        model(input_ids=ids)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B.a1" in name:
                parameter.mul_(3)
        expected = model(input_ids=ids, adapter_names=[name or "__base__" for name in ADAPTERS]).logits
        with row_lora.rows(ADAPTERS):
            got = model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dora_adapters_are_left_to_peft():
    from peft import LoraConfig

    model = two_adapters()
    model.add_adapter("dora", LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    row_lora = RowLora(model)
    assert row_lora.supports(["a0", "a1", None]) and not row_lora.supports(["a0", "dora"])
    with pytest.raises(ValueError, match="dora"):
        with row_lora.rows(["dora"]):
            pass


@torch.no_grad()
def test_a_mixed_row_batch_decodes_in_the_lean_step_as_each_adapter_alone():
    from test_decoding import prompts
    from tunesmith.inference.decoding import Row, RowBatch

    model = two_adapters()
    asked = prompts(len(ADAPTERS), seed=5)
    batch = RowBatch(model, mixed_adapters=True)
    lean_steps = []
    lean = batch.lean
    batch.lean = lambda *args: lean_steps.append(1) or lean(*args)
    rows = [Row(prompt, adapter=adapter) for prompt, adapter in zip(asked, ADAPTERS)]
    batch.join(rows, room=9)  # one prefill per adapter
    for _ in range(7):
        batch.step()
    assert len(lean_steps) == 7  # the mixed batch stepped in the lean step, not model(...)
    alone = []
    for prompt, adapter in zip(asked, ADAPTERS):
        single = RowBatch(model)  # the model as it is: its active adapter, or adapters off
        if adapter in (None, "__base__"):
            with model.disable_adapter():
                single.join([Row(prompt)], room=9)
                for _ in range(7):
                    single.step()
        else:
            model.set_adapter(adapter)
            single.join([Row(prompt)], room=9)
            for _ in range(7):
                single.step()
        alone.append(single.rows[0].tokens)
    assert [row.tokens for row in rows] == alone
    assert len({tuple(tokens) for tokens in alone}) > 2  # the adapters lead to different tokens


@torch.no_grad()
def test_rows_of_several_adapters_sharing_a_start_join_in_two_forwards():
    from test_decoding import shared_start_prompts
    from tunesmith.inference.decoding import Row, RowBatch

    model = two_adapters()
    asked = shared_start_prompts(len(ADAPTERS))
    batch = RowBatch(model, mixed_adapters=True)
    forwards = []
    original = batch._forward
    batch._forward = lambda ids, *rest: forwards.append(tuple(ids.shape)) or original(ids, *rest)
    rows = [Row(prompt, adapter=adapter) for prompt, adapter in zip(asked, ADAPTERS)]
    batch.join(rows, room=6)
    assert len(forwards) == 2 and forwards[0][0] == 4  # the start of each of the 4 adapters (None too), then all rows
    assert set(batch.prefixes) == {"a0", "a1", "__base__", None}
    for _ in range(5):
        batch.step()
    for row, prompt, adapter in zip(rows, asked, ADAPTERS):
        single = RowBatch(model, mixed_adapters=True)  # alone: no shared start, the whole prompt
        single.join([Row(prompt, adapter=adapter)], room=6)
        for _ in range(5):
            single.step()
        assert row.tokens == single.rows[0].tokens


@torch.no_grad()
def test_siblings_reading_one_input_run_one_down_product():
    """q/k/v (one input) and gate/up (another) each take their ``down`` columns from one product: 4 ``down``
    products per decoder layer (q/k/v, o, gate/up, down), not one per adapted layer (7)."""
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    model = two_adapters()
    ids = torch.randint(3, 80, (len(ADAPTERS), 5), generator=torch.Generator().manual_seed(1))
    row_lora = RowLora(model)
    seen = []

    class Count(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.linear:
                seen.append(id(args[1]))
            return func(*args, **(kwargs or {}))

    with row_lora.rows(ADAPTERS), Count():
        got = model(input_ids=ids).logits
    stacks = [stack for per_layer in row_lora._stacks.values() for stack in per_layer.values() if stack is not None]
    downs = {id(stack.down) for stack in stacks} | {id(stack.group.down) for stack in stacks if stack.group}
    assert sum(weight in downs for weight in seen) == 4 * model.config.num_hidden_layers
    expected = model(input_ids=ids, adapter_names=[name or "__base__" for name in ADAPTERS]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_one_adapters_rows_skip_the_scaling_kernel_with_the_same_bits(dtype, monkeypatch):
    """A batch whose rows all use one adapter with power-of-two scalings (a0: alpha/r = 2) multiplies by its
    scaled A matrices, no ``keep``: bit for bit the logits of the general path (product, then times ``keep``),
    which a non-power-of-two scaling (a1: 6/2 = 3) still takes."""
    model = two_adapters(dtype)
    ids = torch.randint(3, 80, (3, 6), generator=torch.Generator().manual_seed(2))
    row_lora = RowLora(model)
    for adapter, fast in (("a0", True), ("a1", False)):
        kept = []
        monkeypatch.setattr(RowLora, "keep", lambda self, *args, kept=kept, original=RowLora.keep:
                            kept.append(1) or original(self, *args))
        with row_lora.rows([adapter] * 3):
            got = model(input_ids=ids).logits
        assert (not kept) == fast
        with row_lora.rows([adapter] * 3):
            row_lora._one_adapter = False  # the general path for the same rows
            general = model(input_ids=ids).logits
        monkeypatch.undo()
        assert torch.equal(got, general)
        model.set_adapter(adapter)
        torch.testing.assert_close(got, model(input_ids=ids).logits, **({} if dtype == torch.float32 else
                                                                         {"rtol": 0.05, "atol": 0.05}))
