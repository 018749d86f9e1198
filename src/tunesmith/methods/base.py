"""The method contract: how a fine-tuning method plugs into the one training loop.

A method is applied to a freshly loaded model, decides which parameters train, saves what it
trained, loads it back onto a base model and, where the maths allows, merges it into the weights.
The loop, checkpoints, evaluation and inference never ask which method is running.
"""

from __future__ import annotations

import difflib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from tunesmith.core.errors import TunesmithError, decode_utf8
from tunesmith.core.registry import Registry

MANIFEST = "tunesmith.json"


class NotMergeable(TunesmithError):
    """This method's result cannot be folded into the base weights; the message says why."""


class Method(ABC):
    """One fine-tuning method, configured by its recipe section.

    Attributes:
        kind: The ``method.kind`` it is registered under.
        artifact: Name of the result folder: ``adapter`` (small, needs the base model) or ``model``
            (a complete Hugging Face model folder).
        description: One line shown by ``tunesmith methods``.
    """

    kind: ClassVar[str]
    artifact: ClassVar[str]
    description: ClassVar[str] = ""
    supports_packing: ClassVar[bool] = True  # False where every row gets virtual tokens prepended

    def __init__(self, config) -> None:
        self.config = config

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare a loaded model for training and set ``requires_grad`` on what trains.

        Returns:
            The model to train (the same object or a wrapper around it).
        """

    @abstractmethod
    def save(self, model: nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        """Write the trained result to ``directory`` (created by the caller).

        ``state_dict``: the model's whole state gathered from its shards (``train.distributed:
        fsdp``), to save instead of the model's own parameters.
        """

    @abstractmethod
    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        """Put a saved result onto ``base_model`` and return the model ready for inference."""

    def merge(self, model: nn.Module) -> nn.Module:
        """Fold the trained result into plain base weights.

        Raises:
            NotMergeable: When the method's maths does not allow it.
        """
        raise NotMergeable(f"method '{self.kind}' has nothing to merge")

    def newly_trainable(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        """Parameters that start training at ``step`` (e.g. gradual unfreezing); none by default.

        Must depend on ``step`` alone (not on earlier calls): a resumed run replays it for every
        step already done to rebuild the optimizer's parameter groups.
        """
        return []

    def bind_training(self, steps_per_epoch: int, total_steps: int) -> None:
        """Told once by the trainer how long an epoch and the run are (for schedules in epochs)."""

    def summary(self) -> str:
        """A line the run prints after the method is set up (e.g. an unfreezing schedule); may be empty."""
        return ""

    def param_groups(self, model: nn.Module, train_config) -> list[dict]:
        """The optimizer's parameter groups: by default weight decay on matrices, none on 1-D.

        A method overrides this to give some parameters their own learning rate (LoRA+).
        """
        trainable = [p for p in model.parameters() if p.requires_grad]
        return decay_groups(trainable, train_config.weight_decay)

    def cast_for_autocast(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                             store_frozen_base: bool = True) -> None:
        """Adjust ``model`` (after :meth:`apply`) for training under ``dtype`` autocast; nothing by default."""

    def fuse_for_training(self, model: nn.Module) -> tuple[int, Callable[[], None]]:
        """Swap faster training forwards into the method's own layers (after :meth:`apply`), for one run.

        Returns:
            How many layers were swapped, and what puts their own forwards back; none by default.
        """
        return 0, lambda: None

    def base_model(self, model: nn.Module) -> nn.Module:
        """The transformers model inside what :meth:`apply` returned (its config, decoder, attention)."""
        return base_model_of(model)

    # Shared behaviour, the same for every method.

    def trainable_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters that train, by name: what a checkpoint must keep."""
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    def load_trainable_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`trainable_state` into ``model``.

        Raises:
            TunesmithError: If the checkpoint does not match the model (another method or model).
        """
        parameters = dict(model.named_parameters())
        unknown = sorted(set(state) - set(parameters))
        if unknown:
            raise TunesmithError(
                f"checkpoint holds parameters this model does not have (e.g. {unknown[0]}); "
                "it was written by another recipe"
            )
        with torch.no_grad():
            for name, value in state.items():
                parameters[name].copy_(value)

    def write_manifest(self, directory: Path, **extra) -> None:
        """Record which method wrote ``directory`` so inference can load it back."""
        manifest = {"method": self.kind, "config": self.config.model_dump(mode="json"), **extra}
        (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def base_model_of(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP, tunesmith's and peft's wrappers (the model itself if none)."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    model = getattr(model, "peft_model", model)  # VirtualTokenModel
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def read_manifest(folder: Path) -> dict:
    """The manifest (``tunesmith.json``) a method wrote beside its result.

    Raises:
        TunesmithError: If it is missing, not JSON, or lacks the method and its settings.
    """
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise TunesmithError(f"{folder} is not a tunesmith result (no {MANIFEST}); give a run's adapter/ or model/ folder")
    try:
        manifest = json.loads(decode_utf8(path, path.read_bytes(), "manifest"))
    except (ValueError, RecursionError) as error:
        where = f", line {error.lineno}" if isinstance(error, json.JSONDecodeError) else ""
        raise TunesmithError(f"{path}{where}: the manifest is damaged ({str(error).splitlines()[0]}); "
                             "restore it from the run, or train again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict) or "kind" not in manifest["config"]:
        raise TunesmithError(f"{path}: the manifest lacks the method's settings ('config' with a 'kind'); "
                             "restore it from the run, or train again")
    return manifest


def store_frozen_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Hold every frozen floating-point parameter of ``model`` in ``dtype``; trainable ones keep theirs.

    Under autocast a frozen float32 weight is cast to ``dtype`` at every step anyway (about 9% of a
    SmolLM2 LoRA step and a second copy at peak); stored in ``dtype`` it is cast once. Tied weights
    stay tied (the parameter object is kept, only its data changes).

    Returns:
        How many parameters were converted.
    """
    converted = 0
    for parameter in model.parameters():
        if not parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != dtype:
            parameter.data = parameter.data.to(dtype)
            converted += 1
    return converted


def trainable_in_float32(model: nn.Module) -> int:
    """Hold every trainable floating-point parameter of ``model`` in float32 (the optimizer's dtype).

    The counterpart of :func:`store_frozen_in` for a model loaded in bfloat16 for a run that holds its
    frozen base in bfloat16: what trains (adapters, a new head) stays float32.

    Returns:
        How many parameters were converted.
    """
    converted = 0
    for parameter in model.parameters():
        if parameter.requires_grad and parameter.is_floating_point() and parameter.dtype != torch.float32:
            parameter.data = parameter.data.float()
            converted += 1
    return converted


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += logical_numel(parameter)
        trainable += logical_numel(parameter) if parameter.requires_grad else 0
    return trainable, total


def logical_numel(parameter: torch.Tensor) -> int:
    """How many weights ``parameter`` stands for: a bitsandbytes 4-bit weight packs two into each byte it holds."""
    quant_state = getattr(parameter, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(torch.Size(shape).numel()) if shape is not None else parameter.numel()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ``nn.ModuleList`` in the model.

    Raises:
        TunesmithError: If the model has no ``nn.ModuleList`` of blocks.
    """
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        raise TunesmithError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


def decay_groups(parameters: list[nn.Parameter], weight_decay: float, **options) -> list[dict]:
    """Split ``parameters`` into a weight-decay group (matrices) and a no-decay group (biases, norms)."""
    decay = [p for p in parameters if p.ndim >= 2]
    no_decay = [p for p in parameters if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay, **options},
              {"params": no_decay, "weight_decay": 0.0, **options}]
    return [group for group in groups if group["params"]]


def check_module_names(model: nn.Module, wanted: list[str] | tuple[str, ...], field: str) -> None:
    """Every name in ``wanted`` must be the last part of some module's name (how peft matches targets).

    Raises:
        TunesmithError: For a name that matches nothing, listing the model's closest module names.
    """
    leaf_names = sorted({name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name})
    for name in wanted:
        if name not in leaf_names:
            close = difflib.get_close_matches(name, leaf_names, n=5, cutoff=0.3) or leaf_names[:8]
            raise TunesmithError(
                f"{field}: no module named '{name}' in {type(model).__name__}; closest module names: "
                f"{', '.join(close)}"
            )


METHODS: Registry[type[Method]] = Registry("method")
