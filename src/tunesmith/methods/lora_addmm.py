"""LoRA's update added by one ``addmm`` in training: no separate ``* scaling`` and ``+`` kernels.

peft computes ``result + lora_B(lora_A(dropout(x))) * scaling``: after the two small products it
reads and writes the whole (tokens x out) activation twice more, once to scale and once to add,
and autograd keeps the scaled copy's inputs. The same sum is
``torch.addmm(result, dropout(x)·Aᵀ, Bᵀ, alpha=scaling)``: one kernel that accumulates into ``result``,
whose backward scales only the (tokens x rank) products. In float32 the result equals peft's to
rounding; under bfloat16 autocast it rounds once instead of three times.

:func:`fuse_lora_updates` swaps this forward in for one run on peft's plain ``Linear`` LoRA layers
where it holds (one active adapter, no DoRA or other variant, no LoRA bias, an
``nn.Linear`` base); every other case, and every forward it cannot take (merged, adapters disabled,
mixed adapters per row, dtypes that differ outside autocast), goes to peft's own forward.

Without dropout and with a frozen base (every LoRA run: the base never trains), the whole layer is one
autograd function, :class:`LoraLinearFunction`, whose forward accumulates the update into the base
product's own buffer and whose backward accumulates the LoRA part of x's gradient, ``(g·B)·A·s``, into
``g·W``'s. Written with ``addmm``, inductor lowers ``addmm(result, down, Bᵀ)`` to an ``addmm`` with
``out=`` a new buffer, and aten first copies ``result`` into it: seven (tokens x out) copies per SmolLM2
layer, 210 a step (RESULTS.md, sessions 12 lora31 and 13 inplace32); an in-place ``addmm_`` is
functionalised back into the same copy. :func:`product_plus_low_rank` is one custom op that allocates the
product and adds the update into it in place, so no graph sees a mutation and none needs a copy; in the
backward it makes x's gradient one product and one accumulation instead of two products and a sum. The
frozen base's gradient is never computed.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.core.swaps import bound, swap_forwards

logger = logging.getLogger(__name__)


def _single_plain_adapter(layer: nn.Module) -> bool:
    """Whether ``layer`` is peft's LoRA ``Linear`` with one plain adapter that one ``addmm`` can add."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    if type(layer) is not LoraLinear or type(layer.base_layer) is not nn.Linear or len(layer.active_adapters) != 1:
        return False
    name = layer.active_adapters[0]
    return (name in layer.lora_A and name not in layer.lora_variant and not layer.use_dora.get(name, False)
            and layer.lora_B[name].bias is None)


@torch.library.custom_op("tunesmith::product_plus_low_rank", mutates_args=())
def product_plus_low_rank(a: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float,
                          bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``a·b (+ bias) + alpha·(down·up)``, the low-rank product added into the big one's buffer, no copy of it.

    One op (not ``mm`` then ``addmm_``) so that torch.compile, which would functionalise the in-place
    ``addmm_`` back into a copying ``addmm``, sees no mutation: inductor calls it as one extern kernel.

    Args:
        a: (tokens, k). b: (k, n): usually a transposed weight. down: (tokens, rank). up: (rank, n).
        alpha: The update's scale.
        bias: (n,) or None.

    Returns:
        (tokens, n), a new tensor in ``a``'s dtype.
    """
    product = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b)  # (tokens, n)
    return product.addmm_(down, up, alpha=alpha)


@product_plus_low_rank.register_fake
def _(a: torch.Tensor, b: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float,
      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


class LoraLinearFunction(torch.autograd.Function):
    """A frozen linear plus its LoRA update, ``x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ``, each sum made in the big product's buffer.

    The backward computes the same products as autograd through :func:`addmm_forward`'s ``addmm`` form
    (``gd = s·g·B``, ``∂A = gdᵀ·x``, ``∂B = s·gᵀ·down``, ``∂x = g·W + gd·A``), the last one by
    :func:`product_plus_low_rank`, and never W's or the bias's gradient (the caller takes this path only
    when they are frozen). All inputs share one dtype: the caller casts them as autocast would.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], weight_a: torch.Tensor,
                weight_b: torch.Tensor, scaling: float) -> torch.Tensor:
        down = torch.mm(x, weight_a.t())  # (tokens, rank)
        ctx.save_for_backward(x, weight, weight_a, weight_b, down)
        ctx.scaling = scaling
        return product_plus_low_rank(x, weight.t(), down, weight_b.t(), scaling, bias)  # (tokens, out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, weight_a, weight_b, down = ctx.saved_tensors
        grad_down = torch.mm(grad, weight_b).mul_(ctx.scaling)  # (tokens, rank)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = product_plus_low_rank(grad, weight, grad_down, weight_a, 1.0)  # (tokens, in)
        if ctx.needs_input_grad[3]:
            grad_a = torch.mm(grad_down.t(), x)  # (rank, in)
        if ctx.needs_input_grad[4]:
            grad_b = torch.mm(grad.t(), down).mul_(ctx.scaling)  # (out, rank)
        return grad_x, None, None, grad_a, grad_b, None


def _one_function_forward(layer: nn.Module, name: str, x: torch.Tensor) -> Optional[torch.Tensor]:
    """The layer by :class:`LoraLinearFunction` where it holds (no dropout, frozen base), else None."""
    base = layer.base_layer
    if not isinstance(layer.lora_dropout[name], nn.Identity) or base.weight.requires_grad or (
            base.bias is not None and base.bias.requires_grad):
        return None
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    bias = None if base.bias is None else base.bias.to(dtype)
    output = LoraLinearFunction.apply(x.reshape(-1, x.shape[-1]).to(dtype), base.weight.to(dtype), bias,
                                      layer.lora_A[name].weight.to(dtype), layer.lora_B[name].weight.to(dtype),
                                      layer.scaling[name])  # (tokens, out)
    return output.view(*x.shape[:-1], output.shape[-1])


def addmm_forward(layer: nn.Module, name: str, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """peft's ``Linear.forward`` for one plain adapter, with the update added by ``addmm``.

    Args:
        layer: peft's LoRA ``Linear``, checked by :func:`_single_plain_adapter` when swapped in.
        name: Its adapter's name.
        x: (..., in_features).

    Returns:
        (..., out_features), in the dtype peft's forward returns.
    """
    if args or kwargs or layer.disable_adapters or layer.merged or layer.active_adapters != [name]:
        return type(layer).forward(layer, x, *args, **kwargs)
    weight_a, weight_b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (rank, in), (out, rank)
    if not torch.is_autocast_enabled(x.device.type) and len({x.dtype, layer.base_layer.weight.dtype,
                                                              weight_a.dtype, weight_b.dtype}) != 1:
        return type(layer).forward(layer, x)  # peft's casts decide the dtypes
    output = _one_function_forward(layer, name, x)
    if output is not None:
        return output
    result = layer.base_layer(x)  # (..., out)
    down = F.linear(layer.lora_dropout[name](x), weight_a)  # (..., rank): peft's dropout, the same draw
    summed = torch.addmm(result.reshape(-1, result.shape[-1]), down.reshape(-1, down.shape[-1]), weight_b.t(),
                         alpha=layer.scaling[name])  # (tokens, out)
    return summed.view(result.shape)


def active_addmm_forward(layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """:func:`addmm_forward` for the layer's one active adapter where it is plain, else peft's own forward."""
    names = layer.active_adapters  # as _single_plain_adapter checked when swapping in; another may be active now
    if (len(names) != 1 or names[0] not in layer.lora_A or names[0] in layer.lora_variant
            or layer.use_dora.get(names[0], False) or layer.lora_B[names[0]].bias is not None):
        return type(layer).forward(layer, x, *args, **kwargs)
    return addmm_forward(layer, names[0], x, *args, **kwargs)


def fuse_lora_updates(model: nn.Module) -> tuple[int, Callable[[], None]]:
    """Swap :func:`addmm_forward` in for every LoRA ``Linear`` of ``model`` with one plain adapter, for one run.

    Returns:
        How many layers were swapped, and what puts peft's forward back.
    """
    swapped = [module for module in model.modules() if _single_plain_adapter(module)]
    restore = swap_forwards(swapped, bound(active_addmm_forward))
    if swapped:
        logger.info("LoRA updates added by addmm on %d layers", len(swapped))
    return len(swapped), restore

