"""The methods that peft implements well: apply, save, load and merge through peft.

The saved folder is an ordinary peft adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``), so ``PeftModel.from_pretrained`` loads it without tunesmith.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.methods.base import Method


class PeftMethod(Method):
    """A method whose adapter is built by ``peft.get_peft_model`` from :meth:`peft_config`."""

    artifact = "adapter"

    @abstractmethod
    def peft_config(self, model: nn.Module):
        """The peft configuration for ``model`` (validated against its module names)."""

    def apply(self, model: nn.Module) -> nn.Module:
        from peft import get_peft_model

        config = self.peft_config(model)
        try:
            return get_peft_model(model, config)
        except ValueError as error:  # peft's word for "this method does not fit this model"
            raise TunesmithError(f"method '{self.kind}' does not fit {type(model).__name__}: {error}") from None

    def save(self, model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            return model  # already merged: merging twice changes nothing
        return model.merge_and_unload()
