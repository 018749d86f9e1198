"""P-tuning through peft (Liu et al., 2021, https://arxiv.org/abs/2103.10385)."""

from __future__ import annotations

from torch import nn

from tunesmith.methods.base import METHODS
from tunesmith.methods.virtual_tokens import VirtualTokenMethod


@METHODS.register_kind
class PTuning(VirtualTokenMethod):
    """Virtual tokens produced by a small prompt encoder (MLP or bidirectional LSTM)."""

    kind = "ptuning"
    description = "Virtual tokens produced by a small prompt encoder (MLP or LSTM), prepended to the input."
    not_mergeable_because = ("P-tuning prepends virtual tokens made by its prompt encoder, which are not any "
                             "token's embedding, so no plain model without them gives the same outputs")

    def peft_config(self, model: nn.Module | None = None):
        from peft import PromptEncoderConfig

        return PromptEncoderConfig(num_virtual_tokens=self.config.virtual_tokens,
                                   encoder_reparameterization_type=self.config.encoder.upper(),
                                   encoder_hidden_size=self.config.encoder_hidden, task_type="CAUSAL_LM")
