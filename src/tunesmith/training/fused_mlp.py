"""The gated MLP's ``silu(gate) · up`` as one autograd function that keeps gate and up only.

Llama's MLP (and every family's copy: Qwen2, Mistral, SmolLM...) computes
``down(silu(gate(x)) · up(x))``. Autograd keeps, per layer, ``gate`` for SiLU's backward and both
factors of the product, ``silu(gate)`` and ``up``, for the product's: three (tokens x intermediate)
tensors. :class:`SiluMulFunction` computes the same forward (the same two ops, bit for bit), keeps
``gate`` and ``up`` and recomputes ``silu(gate)`` in the backward, which then runs the very ops
autograd would (``grad · silu(gate)``, ``silu_backward(grad · up, gate)``): the gradients are bit for bit
eager's too. down_proj keeps its input, the product, for its own backward (its weight's gradient,
or LoRA's A); a saved-tensor hook holds that as the gate and up already kept and recomputes it there.
Per layer, four (tokens x intermediate) tensors kept become two: on SmolLM2 (intermediate 1,536,
30 layers) at 2,243 tokens, 2 x 2,243 x 1,536 x 30 x 2 bytes = 0.41 GB less for a bfloat16 step, for
one SiLU and one product more in the backward.

:func:`fuse_gated_mlps` swaps it in, for one run, on every module whose ``forward`` is Llama's MLP
forward (compared by bytecode) and whose activation is SiLU, and returns what puts their own back.
"""

from __future__ import annotations

import functools
import logging
import weakref
from typing import Callable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from tunesmith.core.swaps import bound, same_code, swap_forwards

logger = logging.getLogger(__name__)


class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up``, keeping ``gate`` and ``up`` (not ``silu(gate)``) for the backward pass."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[1]:
            grad_up = grad_output * F.silu(gate)  # silu recomputed: the forward's bits
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad_output * up, gate)  # what autograd runs for F.silu
        return grad_gate, grad_up


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` with the lean backward of :class:`SiluMulFunction`."""
    return SiluMulFunction.apply(gate, up)


class _Recomputed:
    """A saved view of ``silu(gate) · up``, held as what recomputes it (gate and up, kept anyway)."""

    __slots__ = ("gate", "up", "nbytes", "size", "stride", "offset", "last")

    def __init__(self, gate: torch.Tensor, up: torch.Tensor, view: torch.Tensor) -> None:
        self.gate, self.up, self.nbytes = gate, up, view.untyped_storage().nbytes()
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()
        self.last: Optional[weakref.ref] = None

    def unpack(self) -> torch.Tensor:
        product = self.last() if self.last is not None else None  # a second op unpacking it shares one recompute
        if product is None:
            product = F.silu(self.gate) * self.up  # the forward's ops on the forward's inputs: the same bits
            if product.untyped_storage().nbytes() != self.nbytes:
                raise RuntimeError("fused SiLU·up: the recomputed product has another layout than the saved one")
            self.last = weakref.ref(product)
        return product.as_strided(self.size, self.stride, self.offset)


class _Delegated:
    """What an enclosing saved-tensor hook (a memory count, say) packed."""

    __slots__ = ("packed",)

    def __init__(self, packed) -> None:
        self.packed = packed


def _down_without_keeping_product(module: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``down_proj(silu(gate) · up)`` where the product, saved by down_proj for its backward, is recomputed there.

    down_proj (its weight's gradient, or LoRA's A) keeps its input, one more (tokens x intermediate)
    tensor per layer; a saved-tensor hook replaces exactly that tensor (same storage and dtype: not a
    copy that autocast made) by the gate and up that :class:`SiluMulFunction` keeps anyway. Every other
    saved tensor goes to the enclosing hook, if any, as if this one were not there.
    """
    product = silu_mul(gate, up)
    if not (torch.is_grad_enabled() and product.requires_grad):
        return module.down_proj(product)
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)  # what torch.utils.checkpoint reads too
    address, dtype = product.untyped_storage().data_ptr(), product.dtype

    def pack(tensor: torch.Tensor):
        if tensor.dtype == dtype and tensor.untyped_storage().data_ptr() == address:
            return _Recomputed(gate, up, tensor)
        return tensor if outer is None else _Delegated(outer[0](tensor))

    def unpack(packed) -> torch.Tensor:
        if isinstance(packed, _Recomputed):
            return packed.unpack()
        return packed if outer is None else outer[1](packed.packed)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return module.down_proj(product)


def _fused_forward(module: nn.Module, x: torch.Tensor, recompute_product: bool = True) -> torch.Tensor:
    gate, up = module.gate_proj(x), module.up_proj(x)
    if recompute_product:
        return _down_without_keeping_product(module, gate, up)
    return module.down_proj(silu_mul(gate, up))


def _fused_forward_keeping_product(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _fused_forward(module, x, recompute_product=False)


def _recompute_silu_mul(ctx, op, *args, **kwargs):
    """Selective checkpointing's policy: only SiLU and the product are recomputed, every other op's output is kept."""
    if op in (torch.ops.aten.silu.default, torch.ops.aten.mul.Tensor):
        return torch.utils.checkpoint.CheckpointPolicy.PREFER_RECOMPUTE
    return torch.utils.checkpoint.CheckpointPolicy.MUST_SAVE


def _down_of_product(module: nn.Module, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return module.down_proj(silu_mul(gate, up))


class _CheckpointContextWarning(logging.Filter):
    """Drops torch's once-a-run warning that a checkpoint's ``context_fn`` under compile must not hold in-place ops:
    the region it names here (down_proj of the product, LoRA's out-of-place addmm included) holds none, and in a
    user's training log the advice would be noise about code the user never wrote."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()


_CHECKPOINT_CONTEXT_WARNING = _CheckpointContextWarning()


def _fused_forward_compiled(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The MLP for a compiled layer: down_proj's saved input, the product, recomputed by selective checkpointing.

    Dynamo cannot trace the saved-tensor hook of :func:`_down_without_keeping_product` (three graph breaks a layer,
    down_proj and the residual run eagerly), and inductor's partitioner, left alone, keeps the product (measured:
    +140 MB saved on a SmolLM2 LoRA step). Selective checkpointing says exactly which ops to recompute, dynamo traces
    it into the layer's graph, and eagerly (where a compile fell back) it recomputes the same two ops.
    """
    gate, up = module.gate_proj(x), module.up_proj(x)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return _down_of_product(module, gate, up)
    return torch.utils.checkpoint.checkpoint(
        _down_of_product, module, gate, up, use_reentrant=False,
        context_fn=functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, _recompute_silu_mul))


@functools.lru_cache(maxsize=None)
def _has_llama_forward(cls: type) -> bool:
    """Whether ``cls.forward`` is Llama's MLP forward, instruction for instruction."""
    from transformers.models.llama.modeling_llama import LlamaMLP

    return same_code(cls.forward, LlamaMLP.forward)


def _is_silu(activation) -> bool:
    """SiLU as transformers or torch spell it (a hub kernel's replacement forward is not taken for one)."""
    from transformers.activations import SiLUActivation

    if isinstance(activation, nn.SiLU):
        return True
    return isinstance(activation, SiLUActivation) and "forward" not in activation.__dict__ \
        and type(activation).forward is SiLUActivation.forward


def fuse_gated_mlps(model: nn.Module, recompute_product: bool = True,
                    compiled: bool = False) -> tuple[int, Callable[[], None]]:
    """Swap :func:`silu_mul` into every Llama-form SiLU MLP of ``model``, for one run.

    Args:
        recompute_product: Also recompute ``silu(gate) · up`` where down_proj's backward needs it
            instead of keeping it. Not with activation checkpointing, whose own saved-tensor hooks
            recompute the whole layer.
        compiled: The layers will run under ``torch.compile``: the recompute by selective checkpointing
            (:func:`_fused_forward_compiled`), which dynamo traces, instead of a saved-tensor hook.

    Returns:
        How many MLPs were swapped, and what puts their own forward back.
    """
    swapped = [module for module in model.modules()
               if _has_llama_forward(type(module)) and _is_silu(getattr(module, "act_fn", None))]
    forward = _fused_forward_keeping_product if not recompute_product else (
        _fused_forward_compiled if compiled else _fused_forward)
    if forward is _fused_forward_compiled:
        logging.getLogger("torch._higher_order_ops.wrap").addFilter(_CHECKPOINT_CONTEXT_WARNING)
    restore = swap_forwards(swapped, bound(forward))
    if swapped:
        logger.info("fused SiLU·up on %d %s modules", len(swapped), type(swapped[0]).__name__)
    return len(swapped), restore
