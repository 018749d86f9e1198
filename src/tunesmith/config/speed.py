"""The ``train.speed`` section: levers that make training faster or leaner without changing the maths.

Defaults are the levers that are exact (packing with per-example attention, the chunked loss,
length grouping inside a step) and bfloat16 autocast where the hardware computes bfloat16
natively (``autocast: auto``; float32 elsewhere). ``torch.compile`` costs warm-up: ``auto`` turns it on only
for runs long enough to pay it back; activation checkpointing costs speed and is off until asked for. See ``docs/speed.md``.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import Field

from tunesmith.config.base import Section


class SpeedSection(Section):
    """How each micro-batch is laid out and computed."""

    packing: bool = Field(
        True,
        description="Concatenate each micro-batch's examples into one row without padding; attention stays "
        "inside each example. Falls back to padding for models or methods that cannot honour it.",
    )
    chunked_loss: bool = Field(
        True, description="Cross-entropy over chunks of target tokens; the full (tokens x vocabulary) logits "
        "are never built. Exact."
    )
    loss_chunk_tokens: int = Field(1024, ge=16, description="Target tokens per chunk of the chunked loss.")
    autocast: Literal["off", "auto", "bfloat16"] = Field(
        "auto",
        description="bfloat16 autocast with float32 master weights: 'auto' (default) turns it on where the "
        "hardware computes bfloat16 natively (AVX-512 BF16/AMX CPUs, Ampere+ GPUs), else float32; 'bfloat16' "
        "forces it; 'off' is float32.",
    )
    compile: Union[bool, Literal["auto"]] = Field(
        "auto", description="torch.compile the decoder layers (minutes of warm-up; falls back to eager where "
        "compilation fails). 'auto' (default): on only where the run's planned steps pay the compile back, by "
        "measured figures (CPU, one process, LoRA or full under bfloat16 autocast); the log says why. true/false force it."
    )
    compiled_attention: bool = Field(
        True, description="With compile on and packed rows on a CPU in bfloat16: the packed attention's backward "
        "written out per document and compiled (training/packed_attention.py) instead of the CPU flash kernel's; "
        "the forward stays flash's (same losses), gradients differ by bfloat16 rounding. false: flash's backward."
    )
    group_by_length: bool = Field(
        True, description="Without packing: sort each step's examples by length before splitting them into "
        "micro-batches (same global batch, less padding)."
    )
    activation_checkpointing: Union[bool, Literal["auto"]] = Field(
        False, description="Recompute activations in the backward pass: less memory, some speed lost. 'auto': "
        "`tunesmith train` turns it on only when the plan says the run would not fit without it (docs/plan.md)."
    )
    fused_norm: bool = Field(
        True, description="RMSNorm that keeps its input and one rstd per token for the backward pass instead of "
        "float32 copies (Llama-form norms: Llama, Qwen, Mistral, SmolLM...). Same forward; gradients to rounding."
    )
    fused_mlp: bool = Field(
        True, description="Llama-form SiLU MLPs: silu(gate)·up as one autograd function that keeps gate and up and "
        "recomputes SiLU in the backward (one (tokens x intermediate) tensor less per layer). Same forward and "
        "gradients, bit for bit."
    )
    fused_lora: bool = Field(
        True, description="LoRA: each update is added by one addmm instead of a scale and an add "
        "(bfloat16 rounds once instead of three times)."
    )
    fused_optimizer: bool = Field(
        True, description="torch's fused AdamW (one pass per parameter) instead of whole-model temporaries: "
        "about 0.5 GB less at a SmolLM2 full fine-tune's step, and a faster step. Same weights to float rounding."
    )
    release_memory: Union[bool, Literal["auto"]] = Field(
        "auto", description="Hand the memory glibc holds free back to the operating system before a forward "
        "(malloc_trim), so peak RSS stays near one step's activations instead of growing with the longest batches "
        "seen. 'auto' (default): before every forward for full fine-tuning (its peak RSS binds), else only before a "
        "micro-batch with 3/4 or more of the longest one's tokens, the steps whose activations outgrow the freed "
        "blocks (the pages are not faulted in again every step); true: before every forward; false: never. "
        "The run's log says which. No effect off Linux/glibc."
    )

    @property
    def checkpointing(self) -> bool:
        """Whether activations are recomputed: ``auto`` that no plan check resolved (a run started from Python
        rather than ``tunesmith train``) counts as off, the setting of a run that nothing said would not fit."""
        return self.activation_checkpointing is True
