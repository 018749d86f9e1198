"""GaLore (Zhao et al., 2024, https://arxiv.org/abs/2403.03507) through the ``galore-torch`` package.

The gradients of the 2-D weights inside the transformer blocks are projected to a low rank, so Adam's
two moment buffers of those weights are rank x width instead of height x width; embeddings, the
output head, norms and biases train with ordinary AdamW moments.
"""

from __future__ import annotations

import torch

from tunesmith.config import TrainSection
from tunesmith.core.errors import TunesmithError
from tunesmith.methods.base import transformer_blocks


def galore_parameter_ids(model: torch.nn.Module) -> set[int]:
    """Ids of the trainable 2-D weights of linear layers inside the transformer blocks."""
    blocks = transformer_blocks(model)
    return {id(module.weight) for module in blocks.modules()
            if isinstance(module, torch.nn.Linear) and module.weight.requires_grad}


def build_galore_optimizer(model: torch.nn.Module, section: TrainSection) -> torch.optim.Optimizer:
    """GaLore AdamW: projected groups for block weights, plain groups (decay / no decay) for the rest.

    Raises:
        TunesmithError: If galore-torch is not installed or nothing in the model can be projected.
    """
    try:
        from galore_torch import GaLoreAdamW
    except ImportError:
        raise TunesmithError("train.optimizer=galore_adamw needs the galore-torch package: "
                             "pip install 'tunesmith[galore]'") from None
    projected_ids = galore_parameter_ids(model)
    if not projected_ids:
        raise TunesmithError("train.optimizer=galore_adamw: no trainable linear weights in the transformer blocks "
                             "(GaLore is for full and partial fine-tuning, not adapters)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    projected = [p for p in trainable if id(p) in projected_ids]
    decay = [p for p in trainable if id(p) not in projected_ids and p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    galore = section.galore
    groups = [
        {"params": projected, "weight_decay": section.weight_decay, "rank": galore.rank,
         "update_proj_gap": galore.update_proj_gap, "scale": galore.scale, "proj_type": galore.proj_type},
        {"params": decay, "weight_decay": section.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return GaLoreAdamW([g for g in groups if g["params"]], lr=section.lr, betas=section.betas,
                       no_deprecation_warning=True)
