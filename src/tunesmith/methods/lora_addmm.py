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
"""

from __future__ import annotations

import logging
from typing import Callable

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

