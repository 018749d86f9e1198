"""From ``train.speed`` to the loop's seams: loss function, collation, sampler, model preparation.

``finetune`` calls :func:`prepare_speed` once after the method is applied; the loop itself never
asks which levers are on.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from tunesmith.config import SpeedSection, TrainSection
from tunesmith.runtime import Runtime
from tunesmith.training.batching import StepSampler, collate
from tunesmith.training.chunked_loss import chunked_loss_sum, plain_loss_sum, unwrap
from tunesmith.training.length_grouping import LengthGroupedSampler
from tunesmith.training.packing import enable_packed_attention, pack_collate

logger = logging.getLogger(__name__)


@dataclass
class SpeedSetup:
    """What :func:`prepare_speed` decided; ``seams`` go straight into the loop's ``Trainer``.

    Attributes:
        packing: Micro-batches are packed rows.
        autocast_dtype: The autocast dtype, or None for full precision.
        notes: One phrase per lever, for the run's log.
    """

    loss_fn: Callable
    collate_fn: Callable
    sampler: Optional[object]
    packing: bool
    autocast_dtype: Optional[torch.dtype]
    notes: list[str] = field(default_factory=list)

    @property
    def seams(self) -> dict:
        return {"loss_fn": self.loss_fn, "collate_fn": self.collate_fn, "sampler": self.sampler}

    def describe(self) -> str:
        return "speed: " + ", ".join(self.notes)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (emulated bfloat16 is slower than float32).

    CPUs: AVX-512 BF16 or AMX tiles (torch's own detection); GPUs: what CUDA reports (Ampere on).
    """
    return bfloat16_support(device) is not None


def bfloat16_support(device: torch.device) -> Optional[str]:
    """What computes bfloat16 natively on ``device`` (e.g. "CPU has AVX-512 BF16"), or None."""
    if device.type == "cuda":
        return "GPU computes bfloat16" if torch.cuda.is_bf16_supported(including_emulation=False) else None
    detectors = {"_is_amx_tile_supported": "CPU has AMX", "_is_avx512_bf16_supported": "CPU has AVX-512 BF16"}
    return next((phrase for name, phrase in detectors.items() if getattr(torch.cpu, name, lambda: False)()), None)


def autocast_dtype(section: SpeedSection, device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 when asked for (or 'auto' and native), else None."""
    return autocast_choice(section, device)[0]


def autocast_choice(section: SpeedSection, device: torch.device) -> tuple[Optional[torch.dtype], str]:
    """The autocast dtype (None: float32) and why, for the run's log."""
    if section.autocast == "bfloat16":
        return torch.bfloat16, "bfloat16 autocast (train.speed.autocast: bfloat16)"
    if section.autocast == "off":
        return None, "float32 (train.speed.autocast: off)"
    support = bfloat16_support(device)
    if support is None:
        return None, f"float32 (autocast auto: no native bfloat16 on this {device.type.upper()})"
    return torch.bfloat16, f"bfloat16 autocast (auto: {support})"


def prepare_speed(model: torch.nn.Module, section: SpeedSection, train: TrainSection, runtime: Runtime,
                  lengths: Sequence[int], base_sampler: Optional[object] = None) -> SpeedSetup:
    """Prepare ``model`` in place and build the loop's seams for ``section``.

    Args:
        model: The model after ``method.apply`` (peft-wrapped or plain).
        section: The recipe's ``train.speed``.
        train: The recipe's ``train`` (batch size, accumulation, seed).
        runtime: Device, rank and world size.
        lengths: Token length of every training example (for length grouping).
        base_sampler: The run's sampler when it is not the default one (e.g. data mixing); length
            grouping regroups within its steps.

    Returns:
        The seams and what was switched on.
    """
    notes = []
    packing = section.packing and enable_packed_attention(model)
    notes.append("packing" if packing else "padding")
    loss = functools.partial(chunked_loss_sum, chunk_tokens=section.loss_chunk_tokens) if section.chunked_loss \
        else plain_loss_sum
    notes.append(f"chunked loss ({section.loss_chunk_tokens} tokens)" if section.chunked_loss else "full logits")
    dtype, why = autocast_choice(section, runtime.device)
    if dtype is not None:
        loss = functools.partial(autocast_loss, loss, dtype)
        skip_adapter_input_casts(model)
    notes.append(why)
    if section.activation_checkpointing:
        enable_activation_checkpointing(model)
        notes.append("activation checkpointing")
    if section.compile:
        compile_decoder_layers(model)
        notes.append("torch.compile")
    sampler = base_sampler
    if section.group_by_length and not packing and train.grad_accum > 1:
        sampler = LengthGroupedSampler(base_sampler or StepSampler(len(lengths), train.batch_size, train.grad_accum,
                                                                   runtime.world_size, runtime.rank, train.seed),
                                       lengths)
        notes.append("length-grouped micro-batches")
    return SpeedSetup(loss, pack_collate if packing else collate, sampler, packing, dtype, notes)


def autocast_loss(loss_fn: Callable, dtype: torch.dtype, model: torch.nn.Module,
                  batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``loss_fn`` with its forward pass under autocast; weights and optimizer stay float32."""
    device_type = next(unwrap(model).parameters()).device.type
    with torch.autocast(device_type=device_type, dtype=dtype):
        return loss_fn(model, batch)


def skip_adapter_input_casts(model: torch.nn.Module) -> None:
    """Switch off peft's cast of each adapted layer's input to the adapter's dtype, where it is a no-op.

    Under autocast that cast turns every adapted bfloat16 activation into float32, and autocast
    turns it straight back (two copies per layer). Outside autocast it only matters when the base
    weights and the adapters differ in dtype, so it is switched off only when all weights share one.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    if len({p.dtype for p in model.parameters() if p.is_floating_point()}) != 1:
        return
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = False  # peft's own switch (peft.helpers.disable_input_dtype_casting)


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """transformers' gradient checkpointing per decoder layer (non-reentrant: works with frozen inputs)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5 renamed gradient_checkpointing_enable (the old name warns it will go in v6).
    if hasattr(base, "activation_checkpointing_enable"):
        base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    base.config.use_cache = False


def compile_decoder_layers(model: torch.nn.Module) -> None:
    """``torch.compile`` each decoder layer in place (dynamic shapes: packed rows vary in length).

    Compiling layers rather than the whole model keeps the per-example attention (a Python loop
    over boundaries) out of the graph. Where compilation fails, dynamo's ``suppress_errors``
    runs that layer eagerly instead of stopping the run.
    """
    import torch._dynamo

    torch._dynamo.config.suppress_errors = True  # the fallback: eager where a graph cannot be compiled
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        logger.warning("torch.compile skipped: the model has no decoder.layers")
        return
    for layer in layers:
        layer.compile(dynamic=True)
