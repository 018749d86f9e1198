"""The fused training ops against the implementations they replace: transformers' RMSNorm and peft's LoRA forward."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from tunesmith.methods.lora_addmm import fuse_lora_updates
from tunesmith.training.fused_mlp import fuse_gated_mlps
from tunesmith.training.fused_norm import fuse_rms_norms, rms_norm


def _gradients(module: nn.Module, hidden: torch.Tensor, grad_output: torch.Tensor):
    hidden = hidden.detach().clone().requires_grad_()
    output = module(hidden)
    output.backward(grad_output)
    return output.detach(), hidden.grad, module.weight.grad


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.bfloat16, torch.float32)])
def test_fused_rms_norm_matches_transformers(dtype, weight_dtype):
    """Same output bit for bit; input and weight gradients equal within float rounding of the input's dtype."""
    torch.manual_seed(0)
    norm = LlamaRMSNorm(96, eps=1e-5).to(weight_dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    hidden = (torch.randn(2, 37, 96) * 3).to(dtype)
    grad_output = torch.randn(2, 37, 96).to(torch.promote_types(dtype, weight_dtype))
    reference = _gradients(norm, hidden, grad_output)
    norm.weight.grad = None
    count, restore = fuse_rms_norms(norm)
    assert count == 1
    fused = _gradients(norm, hidden, grad_output)
    restore()
    assert "forward" not in norm.__dict__
    assert torch.equal(fused[0], reference[0])  # the forward is the same ops in the same order
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for mine, theirs in zip(fused[1:], reference[1:]):
        assert mine.dtype == theirs.dtype
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=tolerance, atol=tolerance)


def test_fused_rms_norm_saves_less_for_backward():
    """A bfloat16 input keeps itself and one float32 rstd per token, not a float32 copy of the input."""
    hidden = torch.randn(512, 576, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(576, dtype=torch.bfloat16)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LlamaRMSNorm.forward(type("N", (), {"weight": weight, "variance_epsilon": 1e-5})(), hidden)
    theirs = sum(t.numel() * t.element_size() for t in saved if t is not hidden)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        rms_norm(hidden, weight, 1e-5)
    mine = sum(t.numel() * t.element_size() for t in saved if t is not hidden)
    assert mine == 512 * 4 + 576 * 2  # rstd and the weight
    assert theirs >= 512 * 576 * 4  # a float32 copy of the input at least


def test_fused_rms_norm_swaps_llama_forms_only():
    """Qwen2's copy of Llama's norm is swapped; Gemma's (1 + w) norm keeps its own forward."""
    model = nn.ModuleList([Qwen2RMSNorm(8), GemmaRMSNorm(8), LlamaRMSNorm(8)])
    count, restore = fuse_rms_norms(model)
    assert count == 2
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
    restore()
    assert all("forward" not in module.__dict__ for module in model)


def _tiny_lora(dropout: float = 0.0, dora: bool = False):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                                lora_dropout=dropout, use_dora=dora))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: give the update something to carry
            nn.init.normal_(parameter, std=0.1)
    return model


def _loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_lora_addmm_matches_peft():
    """Loss and every adapter gradient equal to peft's forward in float32 (to rounding); restore puts peft's back."""
    model = _tiny_lora()
    input_ids = torch.randint(0, 64, (2, 19))
    reference_loss, reference = _loss_and_grads(model, input_ids)
    count, restore = fuse_lora_updates(model)
    assert count == 14  # q, k, v, o, gate, up, down in each of two layers
    loss, grads = _loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6)
    with model.disable_adapter():  # a forward it cannot take goes to peft's own
        assert model(input_ids=input_ids).logits.shape == (2, 19, 64)
    restore()
    assert not any("forward" in module.__dict__ for module in model.modules())


def test_lora_addmm_under_bfloat16_autocast_stays_close():
    """With a bfloat16 base under autocast the update rounds once instead of three times: close to peft's."""
    model = _tiny_lora()
    for parameter in model.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(torch.bfloat16)
    input_ids = torch.randint(0, 64, (2, 19))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        reference_loss, reference = _loss_and_grads(model, input_ids)
        count, restore = fuse_lora_updates(model)
        loss, grads = _loss_and_grads(model, input_ids)
    restore()
    assert count == 14
    assert abs(loss.item() - reference_loss.item()) < 0.02
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, reference[name], rtol=0.1, atol=0.05 * reference[name].abs().max().item())


def test_lora_addmm_leaves_dora_to_peft():
    assert fuse_lora_updates(_tiny_lora(dora=True))[0] == 0


def test_lora_addmm_with_dropout_draws_peft_s_mask():
    """With dropout the same seed gives the same mask, so the same loss and gradients as peft's forward."""
    model = _tiny_lora(dropout=0.3).train()
    input_ids = torch.randint(0, 64, (2, 19))
    torch.manual_seed(1)
    reference_loss, reference = _loss_and_grads(model, input_ids)
    restore = fuse_lora_updates(model)[1]
    torch.manual_seed(1)
    loss, grads = _loss_and_grads(model, input_ids)
    restore()
    torch.testing.assert_close(loss, reference_loss, rtol=1e-6, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-6)


def test_fused_adamw_matches_the_default_one():
    """build_optimizer's fused AdamW (train.speed.fused_optimizer) leaves the weights of foreach AdamW, to float rounding."""
    from tunesmith.config import SpeedSection, TrainSection
    from tunesmith.training.schedule import build_optimizer

    torch.manual_seed(0)
    start = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
    gradients = [[torch.randn_like(p) for p in start.parameters()] for _ in range(4)]
    results = []
    for fused in (True, False):
        model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4))
        model.load_state_dict(start.state_dict())
        optimizer = build_optimizer(model, TrainSection(lr=1e-2, weight_decay=0.1,
                                                        speed=SpeedSection(fused_optimizer=fused)))
        assert optimizer.defaults["fused"] is (True if fused else None)
        for step in gradients:
            for parameter, gradient in zip(model.parameters(), step):
                parameter.grad = gradient.clone()
            optimizer.step()
        results.append([p.detach() for p in model.parameters()])
    for fused, default in zip(*results):
        torch.testing.assert_close(fused, default, rtol=1e-6, atol=1e-7)
    assert not torch.equal(results[0][0], start[0].weight)


def _mlp_outputs_and_grads(mlp: nn.Module, hidden: torch.Tensor, grad_output: torch.Tensor, autocast: bool):
    mlp.zero_grad(set_to_none=True)
    hidden = hidden.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        output = mlp(hidden)
    output.backward(grad_output.to(output.dtype))
    return [output.detach(), hidden.grad] + [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True)])
def test_fused_silu_mul_matches_llama_mlp(dtype, autocast):
    """transformers' LlamaMLP with silu(gate)·up fused: output and every gradient bit for bit (float32, bfloat16
    weights, bfloat16 autocast), since the backward runs the ops autograd would; restore puts LlamaMLP's back."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=176, hidden_act="silu")).to(dtype)
    hidden = torch.randn(3, 29, 64).to(dtype)
    grad_output = torch.randn(3, 29, 64)
    reference = _mlp_outputs_and_grads(mlp, hidden, grad_output, autocast)
    count, restore = fuse_gated_mlps(mlp)
    assert count == 1 and "forward" in mlp.__dict__
    fused = _mlp_outputs_and_grads(mlp, hidden, grad_output, autocast)
    restore()
    assert "forward" not in mlp.__dict__
    for mine, theirs in zip(fused, reference):
        assert mine.dtype == theirs.dtype
        assert torch.equal(mine, theirs)


@pytest.mark.parametrize("compiled", [False, True])
def test_fused_silu_mul_with_lora_matches_peft_gradients(compiled):
    """A peft LoRA model with the MLPs fused, in the eager form and the one for compiled layers (selective
    checkpointing, run eagerly here): loss and every adapter gradient equal to peft's own (float32)."""
    model = _tiny_lora()
    input_ids = torch.randint(0, 64, (2, 19))
    reference_loss, reference = _loss_and_grads(model, input_ids)
    count, restore = fuse_gated_mlps(model, compiled=compiled)
    assert count == 2
    loss, grads = _loss_and_grads(model, input_ids)
    restore()
    assert torch.equal(loss, reference_loss)
    for name, grad in grads.items():
        assert torch.equal(grad, reference[name]), name


def test_fused_mlp_keeps_two_intermediate_activations_not_four():
    """Counted through an enclosing saved-tensor hook (which the fused MLP hands every other tensor to): eager
    LlamaMLP keeps gate, silu(gate), up and the product for the backward; the fused one gate and up, the product
    recomputed for down_proj. Gradients through the enclosing hook are still eager's, bit for bit."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, hidden_act="silu"))
    hidden, grad_output = torch.randn(2, 31, 64), torch.randn(2, 31, 64)
    weights = {p.data_ptr() for p in mlp.parameters()}

    def kept_and_grads():
        saved = {}

        def pack(tensor):
            if tensor.untyped_storage().data_ptr() not in weights:
                saved[tensor.untyped_storage().data_ptr()] = tuple(tensor.shape)
            return ("counted", tensor)

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed[1]):
            grads = _mlp_outputs_and_grads(mlp, hidden, grad_output, autocast=False)
        return sorted(shape[-1] for shape in saved.values()), grads

    eager_kept, eager = kept_and_grads()
    _, restore = fuse_gated_mlps(mlp)
    fused_kept, fused = kept_and_grads()
    restore()
    assert eager_kept == [64, 176, 176, 176, 176]  # x, then gate, silu(gate), up, product
    assert fused_kept == [64, 176, 176]  # x, gate, up
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(fused, eager))


def test_fused_mlp_under_activation_checkpointing():
    """With the product not recomputed (apply_speed's choice under checkpointing), checkpointed layers give
    eager's gradients bit for bit."""
    from torch.utils.checkpoint import checkpoint
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, hidden_act="silu"))
    hidden = torch.randn(2, 31, 64, requires_grad=True)

    def grads():
        mlp.zero_grad(set_to_none=True)
        hidden.grad = None
        checkpoint(mlp, hidden, use_reentrant=False).square().sum().backward()
        return [hidden.grad] + [p.grad for p in mlp.parameters()]

    eager = grads()
    _, restore = fuse_gated_mlps(mlp, recompute_product=False)
    fused = grads()
    restore()
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(fused, eager))


def test_fused_mlp_for_compiled_layers_gives_eager_gradients():
    """The compiled layers' MLP (the product recomputed by selective checkpointing), run eagerly as it runs where a
    compile fell back: the output and every gradient equal to eager LlamaMLP's, bit for bit, in float32."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4, hidden_act="silu"))
    hidden, grad_output = torch.randn(2, 31, 64), torch.randn(2, 31, 64)
    eager = _mlp_outputs_and_grads(mlp, hidden, grad_output, autocast=False)
    count, restore = fuse_gated_mlps(mlp, compiled=True)
    fused = _mlp_outputs_and_grads(mlp, hidden, grad_output, autocast=False)
    restore()
    assert count == 1
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(fused, eager))


def test_compiled_fused_mlp_drops_only_torchs_context_fn_warning():
    """Swapped in for compiled layers, the fused MLP's selective checkpoint silences torch's warning about in-place
    ops in a context_fn (none in its region) and nothing else that logger says."""
    import logging

    from transformers.models.llama.modeling_llama import LlamaMLP

    wrap_log = logging.getLogger("torch._higher_order_ops.wrap")

    def passes(message: str) -> bool:
        return wrap_log.filter(logging.LogRecord(wrap_log.name, logging.WARNING, __file__, 1, message, None, None))

    warning = "\nDetected that context_fn is passed to torch.utils.checkpoint under torch.compile.\nPlease make sure"
    mlp = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="silu"))
    _, restore = fuse_gated_mlps(mlp, compiled=True)
    restore()
    assert not passes(warning)
    assert passes("any other warning")


def test_fused_silu_mul_skips_other_activations():
    """An MLP with GELU (or a module that is not Llama's MLP) keeps its own forward."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    gelu = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=4, hidden_act="gelu"))
    count, _ = fuse_gated_mlps(nn.ModuleList([gelu, nn.Linear(4, 4)]))
    assert count == 0 and "forward" not in gelu.__dict__
