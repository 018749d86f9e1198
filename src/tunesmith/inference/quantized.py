"""Int8 and int4 weight-only decoding: the linear layers' weights in int8 (one scale per output channel)
or in int4 (a scale and a zero per group of 32 input columns).

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

Int4 (:class:`Int4Linear`) halves the bytes again: ``torch._weight_int4pack_mm_for_cpu`` (PyTorch's CPU
kernel for 4-bit weights in groups, gpt-fast's int4 mode) took 0.30x float32 ``F.linear``'s time over the
same 211 matrices on two threads (int8's kernel 0.60x, measured in one run). Asymmetric groups of 32 input
columns (as GGUF's Q4_1): ``scale = (max - min) / 15`` and ``w = (q - 8) * scale + zero`` with ``q`` in 0..15. Its
kernel needs bfloat16 activations too (float32 ones took 20x longer), the input size a multiple of the
group and the output size a multiple of 16 (``_convert_weight_to_int4pack_for_cpu`` refuses others): other
layers stay float (stories260k's MLP, 172 wide). The LM head stays int8 (:data:`HEADS`).

The quantised model is a twin of the float one (:func:`quantized_twin`): it shares every parameter but
the linear layers' weights, which it holds quantised (a quarter, int4 an eighth, of their float32 size
more memory), and is made again when a float weight changed in place since (an optimizer step between two calls).
The kinds are one mapping, :data:`LAYERS`, from the ``--quantize`` name to the layer class.
"""

from __future__ import annotations

import copy
import functools
from typing import Optional

import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.inference.compiled import ATTRIBUTE as COMPILED_STEP


class QuantizedLinear(torch.nn.Module):
    """What the quantised layers share: made from an ``nn.Linear`` (its bias shared, not copied), and a forward
    that casts the input rows to bfloat16 (what the kernels take), runs the subclass's :meth:`product` and
    casts back."""

    kernel = ""  # the torch op the subclass needs
    weights = ""  # how its weights are held, for the module's repr

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.bias = bias  # the float layer's own parameter (shared), or None
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "QuantizedLinear":
        return cls(linear.weight, linear.bias)

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows`` (tokens, in) bfloat16 times the weight: (tokens, out) bfloat16."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)  # (tokens, in)
        output = self.product(rows).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return output if self.bias is None else output + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.weights}"


class Int8Linear(QuantizedLinear):
    """``y = x @ (q * scale).T + bias`` with ``q`` int8 (out, in) and ``scale`` bfloat16 (out,).

    Symmetric per-output-channel quantisation: ``scale = max|w_row| / 127``, ``q = round(w / scale)``.
    """

    kernel = "_weight_int8pack_mm"
    weights = "int8 weights"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__(weight, bias)
        float_weight = weight.detach().float()
        scale = (float_weight.abs().amax(dim=1) / 127).clamp(min=1e-12).to(torch.bfloat16)  # (out,)
        quantized = torch.round(float_weight / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
        self.register_buffer("weight", quantized, persistent=False)  # (out, in)
        self.register_buffer("scale", scale, persistent=False)

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        """Whether the kernel takes this layer: the input read in blocks of 16 (with 168 or 172 it read past
        the end: garbage, a segfault)."""
        return linear.in_features % 16 == 0

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by (the reference its products are tested against)."""
        return self.weight.float() * self.scale.float()[:, None]

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(rows, self.weight, self.scale)


GROUP = 32  # input columns sharing one scale and zero (the kernel takes 32, 64, 128 or 256)


def int4_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, scale, zero)`` of ``weight`` (out, in): ``q`` int32 (out, in) in 0..15, ``scale`` and ``zero``
    bfloat16 (out, in / GROUP), so that ``w ~ (q - 8) * scale + zero`` per group of :data:`GROUP` columns.

    ``scale = (max - min) / 15`` and ``zero = min + 8 * scale`` are rounded to bfloat16 first (what the kernel
    reads) and ``q`` rounds to that grid, so each weight lands on the nearest of the 16 values it can take.
    """
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // GROUP, GROUP)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8).to(torch.bfloat16)
    zero = (low + 8 * scale.float()).to(torch.bfloat16)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.int32).reshape(out_features, in_features), scale, zero


class Int4Linear(QuantizedLinear):
    """``y = x @ w.T + bias`` with ``w = (q - 8) * scale + zero`` per group of :data:`GROUP` input columns
    (:func:`int4_grid`), ``q`` packed two to a byte in the kernel's own layout."""

    kernel = "_weight_int4pack_mm_for_cpu"
    weights = f"int4 weights in groups of {GROUP}"

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        super().__init__(weight, bias)
        q, scale, zero = int4_grid(weight)
        packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)  # (out, in / 2) uint8
        self.register_buffer("weight", packed, persistent=False)
        self.register_buffer("scales_and_zeros", torch.stack([scale.t(), zero.t()], dim=-1).contiguous(),
                             persistent=False)  # (in / GROUP, out, 2) bfloat16, as the kernel reads them

    @staticmethod
    def fits(linear: torch.nn.Linear) -> bool:
        """Whether the kernel takes this layer: whole groups of input columns, and the output size a multiple
        of 16 (the packing's block of rows; ``_convert_weight_to_int4pack_for_cpu`` refuses others)."""
        return linear.in_features % GROUP == 0 and linear.out_features % 16 == 0

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by, read back from the packed one: the kernel's float32
        path (exact, slow) applied to the identity."""
        identity = torch.eye(self.in_features)
        return torch._weight_int4pack_mm_for_cpu(identity, self.weight, GROUP, self.scales_and_zeros.float()).t()

    def product(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(rows, self.weight, GROUP, self.scales_and_zeros)


class RescoredHead(torch.nn.Module):
    """A quantised LM head whose :data:`RESCORED` highest logits per row are computed again from the float weight.

    The kernels return bfloat16, so the head's logits come out rounded to 8 bits of mantissa: 0.125 apart
    near 25, where SmolLM2's top logits sit. Near-tied candidates then tie or swap by rounding alone. Asked
    "What is the capital of France?", SmolLM2's int4 twin computed "The" and "L" both as 25.125 and answered
    in French; the same hidden state through the float head gives 25.044 against 25.034 ("The", then "Paris").
    The float weight is the twin's own shared parameter (the tied embedding), so this costs no memory, and
    per row one top-k and a (k x hidden) product (greedy and top-p sampling read these logits; the rest keep
    the quantised product's).
    """

    def __init__(self, quantized: torch.nn.Module, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.quantized = quantized
        self.float_weight, self.bias = linear.weight, linear.bias  # shared parameters, not copies

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.quantized(x).float()  # (..., vocabulary)
        flat, rows = logits.reshape(-1, logits.shape[-1]), x.reshape(-1, x.shape[-1]).float()
        chosen = flat.topk(min(RESCORED, flat.shape[-1]), dim=-1).indices  # (tokens, k)
        exact = torch.einsum("td,tkd->tk", rows, self.float_weight.float()[chosen])
        if self.bias is not None:
            exact = exact + self.bias.float()[chosen]
        return flat.scatter(-1, chosen, exact).reshape(logits.shape).to(x.dtype)


RESCORED = 16  # logits per row a quantised head computes again in float (RescoredHead)
LAYERS = {"int8": Int8Linear, "int4": Int4Linear}  # ``--quantize`` name -> the layer that replaces nn.Linear
# ``--quantize`` name -> the layer the LM head (the output embedding) takes instead, where it differs. Int4's 16
# levels lose the most there (llama.cpp's 4-bit files keep it at 8 bits too): on SmolLM2 the head in int4 raised
# the perplexity of held-out text by 4.4%, in int8 (the rest int4) by nothing measurable (benchmarks/RESULTS.md).
HEADS = {"int4": Int8Linear}
QUANTIZATIONS = tuple(LAYERS)  # what ``--quantize`` / ``decode(quantize=...)`` accept; None keeps the weights as loaded


@functools.lru_cache(maxsize=None)
def kernel_missing(quantize: str) -> Optional[str]:
    """Why this torch cannot run ``quantize``'s kernels (its layer's and its head's: it lacks the op, or the op
    fails on a small layer), or None."""
    for layer in dict.fromkeys([LAYERS[quantize], HEADS.get(quantize, LAYERS[quantize])]):
        if not hasattr(torch, layer.kernel):
            return f"torch {torch.__version__} has no torch.{layer.kernel}"
        try:
            probe = torch.nn.Linear(2 * GROUP, 16)
            with torch.no_grad():
                layer.from_linear(probe)(torch.ones(1, 2 * GROUP))
        except Exception as error:  # noqa: BLE001 - any failure of the kernel means it cannot serve here
            return f"torch.{layer.kernel} fails in torch {torch.__version__} ({type(error).__name__})"
    return None


def check_quantize(model, quantize: Optional[str]) -> None:
    """Raise where ``quantize`` cannot apply to ``model``: an unknown value, a base already quantised
    (QLoRA's 4-bit, bitsandbytes' 8-bit), weights not on the CPU. With ``model`` None, the value alone.

    Raises:
        TunesmithError: One sentence naming ``--quantize`` and what to do instead.
    """
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise TunesmithError(f"--quantize {quantize} is not known: use {' or '.join(QUANTIZATIONS)} "
                             f"(int8 or int4 weights for decoding), or leave it out")
    missing = kernel_missing(quantize)
    if missing:
        others = [kind for kind in QUANTIZATIONS if kind != quantize and not kernel_missing(kind)]
        raise TunesmithError(f"--quantize {quantize} cannot run here: {missing}; "
                             + (f"use --quantize {others[0]} or leave it out" if others else "leave --quantize out"))
    if model is None:
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False) or \
            getattr(getattr(inner, "config", None), "quantization_config", None) is not None:
        raise TunesmithError(f"--quantize {quantize} needs float weights, and this model's base is already quantised "
                             "(a QLoRA 4-bit or 8-bit load): leave --quantize out")
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise TunesmithError(f"--quantize {quantize} is for decoding on the CPU and the model is on {device}: "
                             f"leave --quantize out (bfloat16 weights serve a GPU better)")


def _head_names(model) -> set[str]:
    """The names the LM head goes by in ``model``: the output embedding's, and its ``base_layer`` under LoRA."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    names = {name for name, module in model.named_modules() if head is not None and module is head}
    return names | {f"{name}.base_layer" for name in names}


def _float_linears(model, quantize: str) -> list[tuple[str, torch.nn.Linear, type]]:
    """The plain ``nn.Linear`` layers to quantise and the layer each becomes (:data:`LAYERS`, the head
    :data:`HEADS`): those its ``fits`` takes (every one of SmolLM2's; stories260k's ``down_proj``, 172 wide, stays
    float, and with int4 its ``up_proj``/``gate_proj`` too), not LoRA's own small matrices (``lora_A``/``lora_B``:
    they stay float and add their update)."""
    heads, found = _head_names(model), []
    for name, module in model.named_modules():
        layer = HEADS.get(quantize, LAYERS[quantize]) if name in heads else LAYERS[quantize]
        if type(module) is torch.nn.Linear and ".lora_" not in f".{name}" and layer.fits(module):
            found.append((name, module, layer))
    return found


ATTRIBUTE = "_tunesmith_quantized_twins"  # where a model keeps its twins: {kind: (twin, weight versions it was made from)}


def _versions(model, quantize: str) -> tuple[int, ...]:
    return tuple(module.weight._version for _, module, _ in _float_linears(model, quantize))


def quantized_twin(model, quantize: str):
    """``model`` with ``quantize``'s linear layers (:data:`LAYERS`; the LM head :data:`HEADS`), sharing every
    other parameter and buffer.

    Made once per model and kind and kept on it; made again when one of the float weights changed in place
    since. The twin's compiled step (``decode(..., compile=True)``) is kept on the twin, so it is reused with it.
    """
    check_quantize(model, quantize)
    twins = model.__dict__.setdefault(ATTRIBUTE, {})
    kept, versions = twins.get(quantize), _versions(model, quantize)
    if kept is not None and kept[1] == versions:
        return kept[0]
    memo = {id(tensor): tensor for tensor in [*model.parameters(), *model.buffers()]}  # shared, not copied
    for attribute in (ATTRIBUTE, COMPILED_STEP):  # kept steps and twins are not the twin's
        if model.__dict__.get(attribute) is not None:
            memo[id(model.__dict__[attribute])] = None
    twin = copy.deepcopy(model, memo=memo)
    heads = _head_names(twin)
    for name, module, layer in _float_linears(twin, quantize):
        parent_name, _, child = name.rpartition(".")
        quantized_layer = layer.from_linear(module)
        if name in heads:
            quantized_layer = RescoredHead(quantized_layer, module)
        setattr(twin.get_submodule(parent_name), child, quantized_layer)
    twins[quantize] = (twin, versions)
    return twin
