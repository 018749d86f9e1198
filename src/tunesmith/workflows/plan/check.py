"""Before ``tunesmith train`` loads anything: does the recipe fit this machine's memory, by the shape plan?

The check reads the model's ``config.json`` only (nothing loads) and plans its shape (:mod:`.shapes`) for the
run's largest possible micro-batch (``train.batch_size`` x ``data.max_length``). It refuses a run whose training
peak exceeds the memory available, in one sentence naming the cheapest option that fits, and it resolves
``train.speed.activation_checkpointing: auto`` (on only when the run would not fit without it).

The shape plan knows LoRA (a bfloat16 base), QLoRA nf4 and full fine-tuning; other methods are planned as LoRA
of the same rank would be (their trainable parts are as small or smaller), int8 bases are not checked. A run
whose generous bound (:func:`quick_bound`: float32 weights, and gradients and AdamW moments where the base
trains, and twice the activations SmolLM2 saves) takes under a quarter of the memory available is not planned
at all: it fits, and the check then costs nothing (the quick start on a machine with 14 GB free).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from tunesmith.config import Recipe
from tunesmith.config.recipe import TRAINS_BASE_WEIGHTS
from tunesmith.core.errors import TunesmithError
from tunesmith.models.loading import is_encoder
from tunesmith.models.shapes import build_random_model, shape_config
from tunesmith.workflows.plan.shapes import plan_shape

QUICK_FIT_SHARE = 0.25  # a generous bound on the peak (see quick_bound) under this share of the memory: it fits


def check_fits(recipe: Recipe, path: str, available: Optional[int], gpu: bool = False, refuse: bool = True,
               say: Callable[[str], None] = print) -> Recipe:
    """The recipe to train, with ``activation_checkpointing: auto`` resolved, or a refusal when it cannot fit.

    Args:
        path: The resolved model (alias materialised); a hub id not on disk is not checked.
        available: Bytes of memory free before anything loads (None: unknown, not checked).
        gpu: Whether ``available`` is a GPU's (the peak then holds a CUDA context, not this process).
        refuse: False (``--no-plan-check``): resolve ``auto`` but never refuse.

    Raises:
        TunesmithError: When the recipe's option needs more memory than ``available``.
    """
    speed = recipe.train.speed
    auto = speed.activation_checkpointing == "auto"
    config = _local_config(path)
    if config is None or available is None or recipe.model.quantize == "int8" or not _causal(config):
        return _with_checkpointing(recipe, False) if auto else recipe
    tokens = recipe.train.batch_size * recipe.data.max_length
    if not auto and (not refuse or quick_bound(config, tokens, recipe.method.kind in TRAINS_BASE_WEIGHTS) < QUICK_FIT_SHARE * available):
        return recipe

    rank = getattr(recipe.method, "r", 16)
    plan = plan_shape(config, recipe.model.name, tokens, rank, available)
    kind = "full" if recipe.method.kind == "full" else "lora"
    quantize = "nf4" if recipe.model.quantize == "nf4" else "none"
    own = {o.checkpointing: o for o in plan.options if o.kind == kind and o.quantize == quantize}
    if auto:
        checkpointing = own[False].peak(gpu) > available and own[True].peak(gpu) <= available
        say(f"train.speed.activation_checkpointing: auto -> {'on' if checkpointing else 'off'} (planned peak "
            f"{own[checkpointing].peak(gpu) / 2**30:.1f} GB of {available / 2**30:.1f} GB available)")
        recipe = _with_checkpointing(recipe, checkpointing)
    option = own[bool(recipe.train.speed.activation_checkpointing)]
    if option.peak(gpu) <= available or not refuse:
        return recipe
    fitting = [o for o in plan.options if o.peak(gpu) <= available]
    cheapest = min(fitting, key=lambda o: o.relative_cost, default=None)
    instead = (f"use {cheapest.label} ({_how(cheapest)}, about {cheapest.peak(gpu) / 2**30:.1f} GB)" if cheapest else
               "nothing fits: lower train.batch_size or data.max_length")
    raise TunesmithError(
        f"{recipe.model.name} with {option.label} needs about {option.peak(gpu) / 2**30:.1f} GB at a micro-batch of "
        f"{tokens:,} tokens (train.batch_size x data.max_length) and {available / 2**30:.1f} GB are available: "
        f"{instead}, or pass --no-plan-check to try anyway")


def _how(option) -> str:
    """The recipe fields that choose ``option``."""
    parts = ["method.kind: full"] if option.kind == "full" else ["method.kind: lora"]
    parts.append(f"model.quantize: {option.quantize}" if option.quantize != "none" else "model.dtype: bfloat16")
    parts.append(f"train.speed.activation_checkpointing: {'true' if option.checkpointing else 'false'}")
    return ", ".join(parts)


def _with_checkpointing(recipe: Recipe, on: bool) -> Recipe:
    speed = recipe.train.speed.model_copy(update={"activation_checkpointing": on})
    return recipe.model_copy(update={"train": recipe.train.model_copy(update={"speed": speed})})


def _local_config(path: str):
    """The transformers config of a local model folder (None for anything else: nothing is downloaded here)."""

    folder = Path(path)
    if not (folder / "config.json").is_file():
        return None
    try:
        return shape_config(str(folder))
    except (TunesmithError, ValueError, KeyError):
        return None


def quick_bound(config, tokens: int, trains_base: bool) -> int:
    """More than the recipe's option is expected to take: 16 bytes a parameter when the base trains (float32
    weight, gradient, two AdamW moments), else 5 (a float32 base and room for the method's own), 128 bytes a token per block and hidden unit (twice what SmolLM2's blocks save in float32, less
    under bfloat16 autocast or checkpointing), and the logits three times over in float32."""

    parameters = sum(p.numel() for p in build_random_model(config, "meta").parameters())
    return (16 if trains_base else 5) * parameters + tokens * (config.num_hidden_layers * config.hidden_size * 128 + config.vocab_size * 12)


def _causal(config) -> bool:
    """Whether transformers builds ``config`` as a plain causal LM (the shape plan's model; encoders and models with
    nested text configs, such as vision-language ones, are not planned)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


    plain = config.get_text_config() is config and all(
        isinstance(getattr(config, field, None), int) for field in ("num_hidden_layers", "hidden_size", "vocab_size"))
    return plain and getattr(config, "model_type", None) in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not is_encoder(config)
