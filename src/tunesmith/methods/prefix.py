"""Prefix tuning through peft (Li & Liang, 2021, https://arxiv.org/abs/2101.00190)."""

from __future__ import annotations

from torch import nn

from tunesmith.methods.base import METHODS
from tunesmith.methods.virtual_tokens import VirtualTokenMethod


@METHODS.register_kind
class PrefixTuning(VirtualTokenMethod):
    """Trainable key/value prefixes in every layer, optionally reparameterised by an MLP in training."""

    kind = "prefix"
    description = "Trainable key/value prefixes in every attention layer (optionally through an MLP)."
    not_mergeable_because = ("prefix tuning adds keys and values that every token attends to, which no change "
                             "of the base weights can reproduce")

    def peft_config(self, model: nn.Module | None = None):
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=self.config.virtual_tokens, prefix_projection=self.config.projection,
                                  encoder_hidden_size=self.config.projection_hidden, task_type="CAUSAL_LM")
