"""The methods that peft implements well: apply, save, load and merge through peft.

The saved folder is an ordinary peft adapter folder (``adapter_config.json`` and
``adapter_model.safetensors``), so ``PeftModel.from_pretrained`` loads it without tunesmith.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.methods.base import Method, store_frozen_in


def peft_task_type(model: Optional[nn.Module]) -> str:
    """peft's task type for ``model``: ``CAUSAL_LM`` for a model that generates, ``FEATURE_EXTRACTION`` for an
    encoder loaded bare (peft's causal-LM wrapper needs the generation methods an encoder lacks)."""
    can_generate = getattr(model, "can_generate", None)
    return "CAUSAL_LM" if can_generate is None or can_generate() else "FEATURE_EXTRACTION"


class PeftMethod(Method):
    """A method whose adapter is built by ``peft.get_peft_model`` from :meth:`peft_config`."""

    artifact = "adapter"
    frozen_base_in_autocast_dtype: bool = True  # under autocast the frozen base is stored in its dtype

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

    def save(self, model: nn.Module, directory: Path, state_dict: Optional[dict] = None) -> None:
        model.save_pretrained(directory, state_dict=state_dict)  # peft keeps the adapter's entries of it

    def cast_for_autocast(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16,
                             store_frozen_base: bool = True) -> None:
        """Store the frozen base in ``dtype`` (``store_frozen_base``); switch off peft's input cast where it is a no-op.

        Autocast casts each frozen float32 weight to ``dtype`` at every step (about 9% of a SmolLM2
        LoRA step, and a second copy at peak); held in ``dtype`` it is cast never. The embeddings and
        norms go too, so that a forward outside autocast (validation, generation) runs wholly in
        ``dtype``, as a model loaded in it would; adapters stay float32 for the optimizer.

        peft casts each adapted layer's input to the adapter's dtype.

        Under autocast that cast turns every adapted bfloat16 activation into float32, and autocast
        turns it straight back (two copies per layer). Outside autocast it only matters when the base
        weights and the adapters differ in dtype, so it is switched off only when all weights share one.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer

        if store_frozen_base and self.frozen_base_in_autocast_dtype:
            store_frozen_in(model, dtype)
        if len({p.dtype for p in model.parameters() if p.is_floating_point()}) != 1:
            return
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False  # peft's own switch (peft.helpers.disable_input_dtype_casting)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, directory)

    def merge(self, model: nn.Module) -> nn.Module:
        from peft import PeftModel

        if not isinstance(model, PeftModel):
            return model  # already merged: merging twice changes nothing
        return model.merge_and_unload()
