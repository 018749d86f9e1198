"""Int8 weight-only decoding: the linear layers' weights in int8 with one scale per output channel.

A decode step of one row on a CPU reads every weight once per token and does little arithmetic with
each (a matrix-vector product), so it runs at the speed memory delivers the weights: float32 weights
put a floor under the time per token that no kernel passes. Int8 weights are a quarter of that. The
product runs in ``torch._weight_int8pack_mm`` (PyTorch's own CPU kernel for int8 weights and
per-channel scales, the one gpt-fast's int8 mode uses): on two threads it took 0.54x float32
``F.linear``'s time over SmolLM2's 211 matrices of one step (busy machine, same run).

Why not torchao's ``Int8WeightOnlyConfig``: torchao 0.18 (the wheel that installs beside torch
2.13) no longer calls that kernel; its int8 tensor dequantises the whole weight on every call in
eager mode (8.9 ms for one 576x1536 product, against about 0.1 ms), so it would only pay under
``torch.compile``. The kernel wants bfloat16 activations (with float32 ones it took 3.3x float32
``F.linear``'s time), so each product casts its input to bfloat16 and its output back; norms,
attention, the KV cache and the logits stay in the model's dtype.

What it costs in quality is measured, not assumed (docs/speed.md, benchmarks/RESULTS.md): greedy
token agreement with float32 and the perplexity of held-out text.

The quantised model is a twin of the float one (:func:`int8_twin`): it shares every parameter but
the linear layers' weights, which it holds as int8 (a quarter of their float32 size more memory),
and is made again when a float weight changed in place since (an optimizer step between two calls).
"""

from __future__ import annotations

import copy
from typing import Optional

import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.inference.compiled import ATTRIBUTE as COMPILED_STEP

QUANTIZATIONS = ("int8",)  # what ``--quantize`` / ``decode(quantize=...)`` accept; None keeps the weights as loaded


class Int8Linear(torch.nn.Module):
    """``y = x @ (q * scale).T + bias`` with ``q`` int8 (out, in) and ``scale`` bfloat16 (out,).

    Symmetric per-output-channel quantisation: ``scale = max|w_row| / 127``, ``q = round(w / scale)``.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        float_weight = weight.detach().float()
        scale = (float_weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # (out,)
        quantized = torch.round(float_weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized, persistent=False)  # (out, in)
        self.register_buffer("scale", scale, persistent=False)
        self.bias = bias  # the float layer's own parameter (shared), or None
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "Int8Linear":
        return cls(linear.weight, linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by (the reference its products are tested against)."""
        return self.weight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (tokens, in)
        output = torch._weight_int8pack_mm(rows, self.weight, self.scale).to(x.dtype)  # (tokens, out)
        output = output.reshape(*x.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weights"


def check_quantize(model, quantize: Optional[str]) -> None:
    """Raise where ``quantize`` cannot apply to ``model``: an unknown value, a base already quantised
    (QLoRA's 4-bit, bitsandbytes' 8-bit), weights not on the CPU. With ``model`` None, the value alone.

    Raises:
        TunesmithError: One sentence naming ``--quantize`` and what to do instead.
    """
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise TunesmithError(f"--quantize {quantize} is not known: use {', '.join(QUANTIZATIONS)} "
                             f"(int8 weights for decoding), or leave it out")
    if model is None:
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False) or \
            getattr(getattr(inner, "config", None), "quantization_config", None) is not None:
        raise TunesmithError("--quantize int8 needs float weights, and this model's base is already quantised "
                             "(a QLoRA 4-bit or 8-bit load): leave --quantize out")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise TunesmithError(f"--quantize int8 is for decoding on the CPU and the model is on {device}: "
                             f"leave --quantize out (bfloat16 weights serve a GPU better)")


BLOCK = 16  # the kernel reads the input dimension in blocks of 16: with 168 or 172 it read past the end (garbage, a segfault)


def _float_linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The plain ``nn.Linear`` layers to quantise: every projection and the LM head whose input size is a
    multiple of :data:`BLOCK` (every one of SmolLM2's; stories260k's ``down_proj``, 172 wide, stays float),
    not LoRA's own small matrices (``lora_A``/``lora_B``: they stay float and add their update)."""
    return [(name, module) for name, module in model.named_modules()
            if type(module) is torch.nn.Linear and ".lora_" not in f".{name}" and module.in_features % BLOCK == 0]


ATTRIBUTE = "_tunesmith_int8_twin"  # where a model keeps its int8 twin and the weight versions it was made from


def _versions(model) -> tuple[int, ...]:
    return tuple(module.weight._version for _, module in _float_linears(model))


def int8_twin(model):
    """``model`` with int8 linear layers (:class:`Int8Linear`), sharing every other parameter and buffer.

    Made once per model and kept on it; made again when one of the float weights changed in place since.
    The twin's compiled step (``decode(..., compile=True)``) is kept on the twin, so it is reused with it.
    """
    check_quantize(model, "int8")
    kept = model.__dict__.get(ATTRIBUTE)
    versions = _versions(model)
    if kept is not None and kept[1] == versions:
        return kept[0]
    memo = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}  # shared, not copied
    for attribute in (ATTRIBUTE, COMPILED_STEP):  # kept steps and twins are not the twin's
        if model.__dict__.get(attribute) is not None:
            memo[id(model.__dict__[attribute])] = None
    twin = copy.deepcopy(model, memo=memo)
    for name, module in _float_linears(twin):
        parent_name, _, child = name.rpartition(".")
        setattr(twin.get_submodule(parent_name), child, Int8Linear.from_linear(module))
    model.__dict__[ATTRIBUTE] = (twin, versions)
    return twin
