"""The method contract: how a fine-tuning method plugs into the one training loop.

A method is applied to a freshly loaded model, decides which parameters train, saves what it
trained, loads it back onto a base model and, where the maths allows, merges it into the weights.
The loop, checkpoints, evaluation and inference never ask which method is running.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.registry import Registry

MANIFEST = "tunesmith.json"


class NotMergeable(TunesmithError):
    """This method's result cannot be folded into the base weights; the message says why."""


class Method(ABC):
    """One fine-tuning method, configured by its recipe section.

    Attributes:
        kind: The ``method.kind`` it is registered under.
        artifact: Name of the result folder: ``adapter`` (small, needs the base model) or ``model``
            (a complete Hugging Face model folder).
    """

    kind: ClassVar[str]
    artifact: ClassVar[str]

    def __init__(self, config) -> None:
        self.config = config

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """Prepare a loaded model for training and set ``requires_grad`` on what trains.

        Returns:
            The model to train (the same object or a wrapper around it).
        """

    @abstractmethod
    def save(self, model: nn.Module, directory: Path) -> None:
        """Write the trained result to ``directory`` (created by the caller)."""

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
        """Parameters that start training at ``step`` (e.g. gradual unfreezing); none by default."""
        return []

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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for parameter in model.parameters():
        if id(parameter) in seen:
            continue
        seen.add(id(parameter))
        total += parameter.numel()
        trainable += parameter.numel() if parameter.requires_grad else 0
    return trainable, total


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ``nn.ModuleList`` in the model.

    Raises:
        TunesmithError: If the model has no ``nn.ModuleList`` of blocks.
    """
    lists = [module for module in model.modules() if isinstance(module, nn.ModuleList) and len(module) > 0]
    if not lists:
        raise TunesmithError(f"cannot find the transformer blocks of {type(model).__name__}")
    return max(lists, key=len)


METHODS: Registry[type[Method]] = Registry("method")
