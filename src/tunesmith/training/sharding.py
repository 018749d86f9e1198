"""``train.distributed: fsdp``: PyTorch's FSDP2 (``fully_shard``) and sharded checkpoints.

Each decoder layer, then the whole model, is sharded over the processes torchrun started (gloo on
the CPU, nccl on GPUs); parameters become DTensors holding this process's shard, and FSDP gathers
each layer's full weights only while it runs. Gradients are reduce-scattered and averaged over
processes, as DDP's are, so the loop's token normalisation holds unchanged.

Checkpoints are written with ``torch.distributed.checkpoint`` (DCP): every process writes its own
shards of the trainable weights and the optimizer state, and DCP reshards them when they are read,
so a run saved by 2 processes resumes on 1 or on 4. Scheduler, loop state and each process's RNG
are small and saved beside them. The final model is gathered into one ordinary state dict and
saved by the main process as a plain Hugging Face folder or adapter.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import fresh_partial_folder, partial_folder_name, swap_in_folder
from tunesmith.core.runtime import Runtime
from tunesmith.training.checkpoint import (
    PREFIX,
    TrainState,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    write_checkpoint_manifest,
)

SHARDS = "shards"  # the DCP folder inside a checkpoint
SHARDABLE_METHODS = ("full", "partial", "lora", "ia3")  # their result is the model's own state dict (or peft's part)


def check_sharded_recipe(recipe) -> None:
    """Refuse, before anything runs, what ``train.distributed: fsdp`` cannot do yet.

    Raises:
        TunesmithError: Naming the field and the way out.
    """
    if recipe.train.distributed != "fsdp":
        return
    refused = {
        "method.kind": recipe.method.kind not in SHARDABLE_METHODS,
        "regularise.ewc / regularise.l2sp": recipe.regularise.ewc is not None or recipe.regularise.l2sp > 0,
        "retain": recipe.retain is not None,
        "eval.task": recipe.eval.task is not None,
        "eval.report": recipe.eval.report is not None,
    }
    for field, is_refused in refused.items():
        if is_refused:
            raise TunesmithError(f"{field} does not work with train.distributed: fsdp yet (FSDP supports the methods "
                                 f"{', '.join(SHARDABLE_METHODS)} without forgetting safeguards or after-training "
                                 "evaluation); remove it or use train.distributed: ddp")


def shard_model(model: nn.Module, base: nn.Module, runtime: Runtime) -> None:
    """``fully_shard`` each decoder layer of ``base`` (the model under the method's wrapper), then ``model``.

    Sharding per layer lets FSDP gather one layer's weights at a time; the root call shards what
    is left (embeddings, final norm, head). Frozen and trainable parameters may share a layer
    (LoRA): FSDP2 shards every parameter and reduces gradients only for those that have them.
    """
    from torch.distributed.fsdp import fully_shard

    if not runtime.distributed:
        return  # one process: nothing to shard, checkpoints still go through DCP
    layers = getattr(base.get_decoder(), "layers", None) if hasattr(base, "get_decoder") else None
    if layers is None:
        raise TunesmithError("train.distributed: fsdp needs a decoder model with decoder.layers; use ddp for this model")
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)


def gradient_sync(model: nn.Module, runtime: Runtime, sharded: bool, sync: bool):
    """A context in which backward passes reduce gradients over processes (``sync``) or only accumulate."""
    if sync or not runtime.distributed:
        return contextlib.nullcontext()
    if not sharded:
        return model.no_sync()  # DistributedDataParallel

    @contextlib.contextmanager
    def accumulate_only():
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    return accumulate_only()


def _options(full: bool = False, strict: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Frozen weights (a LoRA run's base model) come from the base model again, not from checkpoints;
    # loading is therefore not strict, and load_sharded_checkpoint checks what was missing.
    return StateDictOptions(full_state_dict=full, cpu_offload=full, ignore_frozen_params=not full, strict=strict)


def save_sharded_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, state: TrainState, keep: int,
                            runtime: Runtime) -> Path:
    """Every process writes its shards into ``folder/step-NNNNNNNN`` (atomically, renamed by the main one)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = folder / f"{PREFIX}{state.step:08d}"
    partial = partial_folder_name(final)  # every process writes here
    if runtime.is_main:
        fresh_partial_folder(final)
    barrier(runtime)
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(partial / SHARDS))
    torch.save(rng_state(), partial / f"rng-{runtime.rank}.pt")
    if runtime.is_main:
        torch.save({"scheduler": scheduler.state_dict(), "world_size": runtime.world_size}, partial / "training.pt")
        (partial / "state.json").write_text(json.dumps(asdict(state), indent=2))
    barrier(runtime)
    if runtime.is_main:
        write_checkpoint_manifest(partial, state.step)  # resume validates every shard against it
        swap_in_folder(partial, final, durable=True)
        prune_checkpoints(folder, keep)
    barrier(runtime)
    return final


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, runtime: Runtime) -> TrainState:
    """Read a sharded checkpoint into ``model`` and ``optimizer`` at this run's world size.

    Raises:
        TunesmithError: If ``path`` was not written with ``train.distributed: fsdp``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    if not (path / SHARDS).is_dir():
        raise TunesmithError(f"{path} is not a sharded checkpoint; resume it with train.distributed: ddp")
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_options())
    loaded = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(loaded, checkpoint_id=str(path / SHARDS))  # reshards to this world size
    keys = set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"],
                          options=_options(strict=False))
    trainable_missing = {name for name, p in model.named_parameters() if p.requires_grad} & set(keys.missing_keys)
    if trainable_missing or keys.unexpected_keys:
        raise TunesmithError(f"{path} does not fit this model: missing {sorted(trainable_missing)[:3]}, unexpected "
                             f"{sorted(keys.unexpected_keys)[:3]}; resume with the recipe that wrote it")
    training = torch.load(path / "training.pt", weights_only=True)
    scheduler.load_state_dict(training["scheduler"])
    rng = path / f"rng-{runtime.rank}.pt"
    if training["world_size"] == runtime.world_size and rng.exists():
        set_rng_state(torch.load(rng, weights_only=True))  # same processes: continue each one's random stream
    return TrainState(**json.loads((path / "state.json").read_text()))


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model as one ordinary state dict on the main process (a collective: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_options(full=True))


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        torch.distributed.barrier()
