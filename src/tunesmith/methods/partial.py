"""Partial fine-tuning: freeze everything but chosen transformer blocks and named modules."""

from __future__ import annotations

import logging

from torch import nn

from tunesmith.errors import TunesmithError
from tunesmith.methods.base import METHODS, transformer_blocks
from tunesmith.methods.full import FullFineTuning

logger = logging.getLogger(__name__)


@METHODS.register("partial")
class PartialFineTuning(FullFineTuning):
    """The last (or first) N blocks and the named modules train; the result is a full model folder."""

    kind = "partial"

    def apply(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        for module in self.chosen_modules(model):
            module.requires_grad_(True)
        return model

    def chosen_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules that train, logged by name."""
        blocks = transformer_blocks(model)
        count = min(self.config.blocks, len(blocks))
        chosen = list(blocks)[-count:] if self.config.blocks_from == "last" else list(blocks)[:count]
        if count == 0:
            chosen = []
        named = dict(model.named_modules())
        for wanted in self.config.modules:
            matches = [name for name in named if name == wanted or name.endswith(f".{wanted}")]
            if not matches:
                examples = ", ".join(name for name in list(named)[1:8])
                raise TunesmithError(
                    f"method.modules: no module named '{wanted}' in {type(model).__name__} (names look like: {examples})"
                )
            logger.info("partial: '%s' matched %s", wanted, ", ".join(matches))
            chosen += [named[name] for name in matches]
        if not chosen:
            raise TunesmithError("method 'partial' trains nothing: set method.blocks > 0 or method.modules")
        logger.info("partial: %d of %d blocks train (%s)", count, len(blocks), self.config.blocks_from)
        return chosen
