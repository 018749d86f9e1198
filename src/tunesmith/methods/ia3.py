"""IA3 through peft: learned vectors rescale keys, values and the feed-forward input.

Liu et al., 2022, https://arxiv.org/abs/2205.05638. The vectors start at one, so the model is
unchanged at initialisation, and fold into the weights they scale (mergeable).
"""

from __future__ import annotations

from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.methods.base import METHODS, check_module_names
from tunesmith.methods.peft_method import PeftMethod, peft_task_type


@METHODS.register_kind
class IA3(PeftMethod):
    """IA3; the result is a peft adapter folder."""

    kind = "ia3"
    description = "Learned vectors rescale keys, values and the feed-forward input (starts as the identity)."

    def peft_config(self, model: nn.Module | None = None):
        from peft import IA3Config

        targets = list(self.config.targets) if self.config.targets is not None else None
        feed_forward = list(self.config.feed_forward) if self.config.feed_forward is not None else None
        if model is not None:
            check_module_names(model, targets or [], "method.targets")
            check_module_names(model, feed_forward or [], "method.feed_forward")
        if targets is not None and feed_forward is not None and not set(feed_forward) <= set(targets):
            raise TunesmithError("method.feed_forward must list only modules that are also in method.targets")
        if targets is not None and feed_forward is None:
            feed_forward = []
        return IA3Config(target_modules=targets, feedforward_modules=feed_forward, task_type=peft_task_type(model))
