"""The stage contract: what a run trains for, next to the method contract (how weights change).

A run is data -> model -> method -> objective -> loop -> result. The stage owns the two ends that
differ between supervised tuning, reward modelling, preference tuning and online RL: how the
recipe's data becomes examples, and the :class:`~tunesmith.training.objective.Objective` the loop
calls (what a batch is, its loss and its validation metrics). Adding a stage is one module here,
its section in :mod:`tunesmith.config.stages`, and its test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

from torch import nn

from tunesmith.config import DataSection
from tunesmith.core.errors import TunesmithError
from tunesmith.core.registry import Registry
from tunesmith.data.encoded import EncodedData
from tunesmith.models import is_encoder
from tunesmith.training.objective import Objective
from tunesmith.training.speed import SpeedSetup


class Stage(ABC):
    """One training stage, configured by the recipe's ``stage`` section.

    Attributes:
        kind: The ``stage.kind`` it is registered under.
    """

    kind: ClassVar[str]

    def __init__(self, config) -> None:
        self.config = config

    def check_model(self, model: nn.Module) -> None:
        """Look at the loaded model before the data is prepared; refuse one the stage cannot train.

        By default an encoder-only model (BERT, MiniLM) is refused: only stage cls trains one.

        Raises:
            TunesmithError: Naming the model type and the stage that trains it.
        """
        config = model.config
        if is_encoder(config):
            name = getattr(config, "_name_or_path", "") or config.model_type
            raise TunesmithError(f"model {name} is an encoder-only model ({config.model_type}); stage {self.kind} "
                                 "needs a causal language model, and only stage cls trains an encoder")

    @abstractmethod
    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        """The training and validation examples of this stage, read from ``data``.

        Raises:
            TunesmithError: If the data lacks what the stage needs (the message names the layout expected).
        """

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Adapt the loaded model before the method is applied (e.g. a scalar head); unchanged by default."""
        return model

    def notes(self) -> list[str]:
        """Lines for the run's log once the model is prepared (e.g. the zero-shot baseline of cls)."""
        return []

    def after_method(self, model: nn.Module) -> None:
        """Called once the method is applied, before any step or resume: e.g. a head the stage added
        trains whatever the method froze, or a frozen copy of the base is kept as a reference."""

    def save(self, model: nn.Module, directory: Path) -> None:
        """Write what the stage adds to the result folder beside the method's artifact (e.g. a head)."""

    def manifest_entries(self) -> dict:
        """What the result's manifest records about the stage, so that evaluation can judge the result again."""
        return {"stage_config": self.config.model_dump(mode="json")}

    @abstractmethod
    def objective(self, speed: SpeedSetup) -> Objective:
        """The loop's objective, using the speed levers that apply to it (packing, fused loss, autocast)."""


STAGES: Registry[type[Stage]] = Registry("stage")
