"""Prompt tuning through peft (Lester et al., 2021, https://arxiv.org/abs/2104.08691)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.methods.base import METHODS
from tunesmith.methods.virtual_tokens import VirtualTokenMethod


@METHODS.register_kind
class PromptTuning(VirtualTokenMethod):
    """A soft prompt: trainable embeddings prepended to the input, random or from a text's embeddings."""

    kind = "prompt"
    description = "Soft prompt: trainable virtual-token embeddings prepended to the input (random or text init)."
    not_mergeable_because = ("prompt tuning prepends learned embeddings that are not any token's embedding, so "
                             "no plain model without them gives the same outputs")

    def peft_config(self, model: nn.Module | None = None):
        from peft import PromptTuningConfig

        if self.config.init_text is None:
            return PromptTuningConfig(num_virtual_tokens=self.config.virtual_tokens, task_type="CAUSAL_LM")
        tokenizer_folder = getattr(model, "name_or_path", "") if model is not None else ""
        if not tokenizer_folder or not Path(tokenizer_folder).is_dir():
            raise TunesmithError("method.init_text needs the model loaded from a local folder with its tokenizer")
        return PromptTuningConfig(num_virtual_tokens=self.config.virtual_tokens, prompt_tuning_init="TEXT",
                                  prompt_tuning_init_text=self.config.init_text,
                                  tokenizer_name_or_path=tokenizer_folder, task_type="CAUSAL_LM")
