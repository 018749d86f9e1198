"""Full fine-tuning: every weight trains; the result is a complete model folder."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from tunesmith.methods.base import METHODS, Method


@METHODS.register_kind
class FullFineTuning(Method):
    """All parameters train."""

    kind = "full"
    artifact = "model"
    description = "Every weight trains; the result is a complete model folder."

    def apply(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(True)
        return model

    def save(self, model: nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        model.save_pretrained(directory, state_dict=state_dict)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(directory, dtype=base_model.dtype).to(base_model.device)

    def merge(self, model: nn.Module) -> nn.Module:
        return model  # already plain weights
