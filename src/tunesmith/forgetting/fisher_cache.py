"""The EWC Fisher of a run: from the on-disk cache, or computed (sharded over processes) and cached."""

from __future__ import annotations

import torch

from tunesmith.config import EwcSection
from tunesmith.core.runtime import Runtime
from tunesmith.forgetting.ewc import (
    diagonal_fisher,
    file_identity,
    fisher_cache_key,
    load_cached_fisher,
    normalise_fisher,
    save_cached_fisher,
)
from tunesmith.forgetting.reference import reference_examples


def fisher_for_run(section: EwcSection, identity: dict, model, tokenizer, runtime: Runtime, say=print,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """The (normalised, if asked) diagonal Fisher of the trainable parameters of ``model``.

    Cached in ``<cache>/fisher/<key>.safetensors``; the key covers the model, the method section, the
    seed (it decides LoRA's initial weights) — ``identity``'s ``model``, ``method`` and ``seed`` — the
    reference data, the Fisher settings and the names and shapes of the trainable parameters.
    """
    trainable = {name: p.shape for name, p in model.named_parameters() if p.requires_grad}
    data_identity = {"generations": True} if section.data == "generations" else file_identity(section.data)
    settings = section.model_dump(mode="json", exclude={"strength", "cache", "max_seconds"})
    key = fisher_cache_key(identity["model"], identity["method"], identity["seed"], data_identity, settings,
                           trainable)
    path = runtime.cache / "fisher" / f"{key}.safetensors"
    fisher = load_cached_fisher(path) if section.cache else None
    if fisher is not None:
        say(f"EWC: Fisher from cache {path}")
        fisher = {name: value.to(runtime.device) for name, value in fisher.items()}
    else:
        fisher = compute_fisher(section, identity["seed"], model, tokenizer, runtime, say, progress)
        if section.cache and runtime.is_main:
            save_cached_fisher(path, fisher, {"model": identity["model"], "data": section.data})
    return normalise_fisher(fisher) if section.normalise == "mean" else fisher


def compute_fisher(section: EwcSection, seed: int, model, tokenizer, runtime: Runtime, say=print,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """Each process takes every world_size-th reference example; the sums are added over processes."""
    examples = reference_examples(section, model, tokenizer, seed)
    mine = examples[runtime.rank :: runtime.world_size]
    say(f"EWC: Fisher on {len(examples)} reference examples ({section.data}), at most {section.max_seconds:g}s")
    fisher, used = diagonal_fisher(model, mine, tokenizer.pad_token_id, runtime.device, section.max_seconds,
                                   progress and runtime.is_main)
    if runtime.distributed:
        counts = torch.tensor([float(used)], dtype=torch.float64, device=runtime.device)
        torch.distributed.all_reduce(counts)
        for value in fisher.values():
            value.mul_(used)
            torch.distributed.all_reduce(value)
            value.div_(float(counts))
        used = int(counts)
    say(f"EWC: Fisher from {used} examples")
    return fisher
