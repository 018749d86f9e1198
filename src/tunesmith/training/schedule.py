"""Learning-rate schedules: linear warmup, then linear or cosine decay (or constant)."""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from tunesmith.config import TrainSection
from tunesmith.training.galore import build_galore_optimizer


def planned_steps(section: TrainSection, steps_per_epoch: int) -> int:
    """The run's optimizer steps: ``max_steps``, else ``epochs`` passes of the sampler's steps (at least one)."""
    return section.max_steps or max(1, round(section.epochs * steps_per_epoch))


def warmup_steps(section: TrainSection, total_steps: int) -> int:
    """Warmup length: ``warmup_steps`` if given, else ``warmup_ratio`` of all steps."""
    if section.warmup_steps is not None:
        return min(section.warmup_steps, total_steps)
    return int(section.warmup_ratio * total_steps)


def lr_multiplier(section: TrainSection, total_steps: int) -> Callable[[int], float]:
    """The factor applied to the peak learning rate before optimizer step ``step`` (0-based)."""
    warmup = warmup_steps(section, total_steps)
    floor = section.min_lr_ratio

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if section.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        progress = min(progress, 1.0)
        if section.schedule == "linear":
            decay = 1.0 - progress
        else:
            decay = 0.5 * (1.0 + math.cos(math.pi * progress))
        return floor + (1.0 - floor) * decay

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, section: TrainSection, total_steps: int):
    """A ``LambdaLR`` following :func:`lr_multiplier`; stepped once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(section, total_steps))


def build_optimizer(model: torch.nn.Module, section: TrainSection,
                    param_groups: Optional[list[dict]] = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters.

    Args:
        param_groups: The method's groups (see ``Method.param_groups``); default: weight decay on
            matrices, none on biases and norm weights (1-D). A group may set its own ``lr``.
    """
    if section.optimizer == "galore_adamw":

        return build_galore_optimizer(model, section)
    if param_groups is None:
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        param_groups = [
            {"params": decay, "weight_decay": section.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
    groups = [g for g in param_groups if g["params"]]
    fused = section.speed.fused_optimizer and can_fuse_adamw([p for g in groups for p in g["params"]])
    return torch.optim.AdamW(groups, lr=section.lr, betas=section.betas, fused=fused or None)


def can_fuse_adamw(parameters: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes ``parameters``: floating point, on the CPU or a CUDA GPU.

    The fused kernel updates each parameter in one pass. The default (``foreach``) builds whole-model
    temporaries (the square root of every second moment, then the update): on a SmolLM2 full fine-tune
    about 0.5 GB more at the optimizer step, and a step several times slower. The updated weights equal
    foreach's to float rounding (tested).
    """
    return bool(parameters) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in parameters)


def clip_and_step(optimizer: torch.optim.Optimizer, parameters: list[torch.Tensor], max_norm: Optional[float],
                  total_norm: torch.Tensor) -> None:
    """The optimizer's step with the gradients clipped to ``max_norm`` (None: not clipped), given their norm.

    ``clip_grad_norm_`` multiplies every gradient by ``min(1, max_norm / (norm + 1e-6))``: one more pass over
    all of them (a full fine-tune's 0.5 GB on SmolLM2) even when the factor is 1. Here a factor of 1 skips the
    pass (multiplying by 1 changes no bit), and a smaller one goes to torch's fused AdamW as its ``grad_scale``
    (the protocol ``GradScaler`` uses), which divides each gradient by it inside the update's own pass: the
    same update to one rounding (``g / (1/c)`` against ``g * c``, tested). Other optimizers, and sharded
    (DTensor) gradients, get ``clip_grad_norm_``'s pass as before.
    """
    if max_norm is not None and not all(type(p.grad) is torch.Tensor for p in parameters):
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)  # sharded (DTensor) gradients
    elif max_norm is not None:
        coefficient = max_norm / (total_norm.float() + 1e-6)  # clip_grad_norm_'s own expression
        if float(coefficient) < 1.0:
            if optimizer.defaults.get("fused") and getattr(optimizer, "grad_scale", None) is None:
                optimizer.grad_scale = (1.0 / coefficient).to(torch.float32)
                try:
                    optimizer.step()
                finally:
                    del optimizer.grad_scale
                return
            torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total_norm)
    optimizer.step()


def add_param_groups(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                     groups: list[dict]) -> None:
    """Add parameter groups to a running optimizer and put them on the same schedule.

    ``LambdaLR`` only knows the groups that existed when it was built (its ``base_lrs`` and
    ``lr_lambdas``); a group added later would keep the peak learning rate forever. Each new group
    gets the first group's multiplier and starts at the current point of the schedule.
    """
    multiplier = scheduler.lr_lambdas[0]
    for group in groups:
        if not group["params"]:
            continue
        optimizer.add_param_group(group)
        added = optimizer.param_groups[-1]
        added["initial_lr"] = added["lr"]
        scheduler.base_lrs.append(added["lr"])
        scheduler.lr_lambdas.append(multiplier)
        added["lr"] = added["initial_lr"] * multiplier(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
