"""Bottleneck adapters (Houlsby et al., 2019, https://arxiv.org/abs/1902.00751; Pfeiffer et al., 2020,
https://arxiv.org/abs/2005.00247).

peft has no bottleneck adapters, so this is our own code, written to the same contract. Each adapter
maps a sub-layer's output ``h`` to ``h + up(act(down(h)))``. Houlsby placement puts one after the
attention and one after the feed-forward sub-layer of every block, Pfeiffer only after the
feed-forward one. The up-projection starts at zero, so the model is unchanged at initialisation.
The adapters live on each block as ``block.bottleneck_adapters`` and are applied by forward hooks
on the sub-layers, so the base model's own parameter names and code stay untouched.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.methods.base import METHODS, Method, NotMergeable, transformer_blocks

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "bottleneck_adapters.safetensors"
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` initialised to zero."""

    def __init__(self, hidden_size: int, bottleneck: int, activation: str) -> None:
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (batch, seq, hidden)
        return hidden + self.up(self.activation(self.down(hidden)))


def _apply_adapter_hook(adapter: BottleneckAdapter):
    """A forward hook that passes a sub-layer's output (or the first item of a tuple) through ``adapter``."""

    def hook(module: nn.Module, inputs, output):
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


@METHODS.register_kind
class BottleneckAdapters(Method):
    """Bottleneck adapters in every transformer block; the result is an adapter folder (safetensors)."""

    kind = "adapter"
    artifact = "adapter"
    description = "Bottleneck adapters after attention and/or feed-forward (Houlsby, Pfeiffer); starts as the identity."

    def apply(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        hidden_size = model.config.hidden_size
        bottleneck = self.bottleneck_size(hidden_size)
        places = ("attention", "feed_forward") if self.config.placement == "houlsby" else ("feed_forward",)
        for block in transformer_blocks(model):
            adapters = nn.ModuleDict()
            for place in places:
                sublayer = self.sublayer(block, place)
                adapters[place] = BottleneckAdapter(hidden_size, bottleneck, self.config.activation).to(
                    device=sublayer_device(block), dtype=sublayer_dtype(block))
                sublayer.register_forward_hook(_apply_adapter_hook(adapters[place]))
            block.bottleneck_adapters = adapters
        logger.info("adapter: %s placement, bottleneck %d of hidden %d", self.config.placement, bottleneck, hidden_size)
        return model

    def bottleneck_size(self, hidden_size: int) -> int:
        """The bottleneck width from ``bottleneck`` or ``hidden_size / reduction_factor``.

        Raises:
            TunesmithError: If it is zero or not smaller than the hidden size.
        """
        size = self.config.bottleneck or hidden_size // self.config.reduction_factor
        if not 0 < size < hidden_size:
            raise TunesmithError(
                f"method.bottleneck/reduction_factor give an adapter width of {size}, but it must be between 1 "
                f"and the hidden size {hidden_size} - 1; choose a bottleneck in that range"
            )
        return size

    def sublayer(self, block: nn.Module, place: str) -> nn.Module:
        """The attention or feed-forward sub-module of ``block``, by the names in the recipe.

        Raises:
            TunesmithError: If the block has no sub-module of that name; lists the ones it has.
        """
        field = "attention_module" if place == "attention" else "feed_forward_module"
        name = getattr(self.config, field)
        children = dict(block.named_children())
        if name not in children:
            raise TunesmithError(
                f"method.{field}: {type(block).__name__} has no sub-module '{name}'; it has {', '.join(children)}"
            )
        return children[name]

    def save(self, model: nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        if state_dict is not None:
            raise TunesmithError("bottleneck adapters cannot be trained with train.distributed: fsdp; use ddp")
        save_file({name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad},
                  directory / WEIGHTS_FILE)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        model = self.apply(base_model)
        self.load_trainable_state(model, load_file(directory / WEIGHTS_FILE, device=str(sublayer_device(model))))
        return model

    def merge(self, model: nn.Module) -> nn.Module:
        raise NotMergeable("bottleneck adapters put a non-linearity between two projections, which no single "
                           "weight matrix of the base model can absorb")


def sublayer_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def sublayer_dtype(module: nn.Module) -> torch.dtype:
    """The block's floating-point dtype (a quantised base also holds 4-bit weights as uint8)."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)
