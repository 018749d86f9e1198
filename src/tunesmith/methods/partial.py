"""Partial fine-tuning: freeze everything but chosen transformer blocks and named modules.

With gradual unfreezing (ULMFiT, Howard & Ruder 2018, https://arxiv.org/abs/1801.06146) training
starts with the chosen blocks and one more block, walking away from the starting end, becomes
trainable every ``unfreeze_every`` steps or epochs; the loop hands those parameters to the optimizer.
"""

from __future__ import annotations

import logging

from torch import nn

from tunesmith.core.errors import TunesmithError
from tunesmith.methods.base import METHODS, transformer_blocks
from tunesmith.methods.full import FullFineTuning

logger = logging.getLogger(__name__)


@METHODS.register_kind
class PartialFineTuning(FullFineTuning):
    """The last (or first) N blocks and the named modules train; the result is a full model folder."""

    kind = "partial"
    description = "Chosen transformer blocks and modules train, the rest is frozen; optional gradual unfreezing."

    def __init__(self, config) -> None:
        super().__init__(config)
        self.steps_per_unfreeze = config.unfreeze_every  # in steps; converted by bind_training for epochs
        self.num_blocks = 0
        self.schedule_text = ""

    def apply(self, model: nn.Module) -> nn.Module:
        self.num_blocks = len(transformer_blocks(model))
        model.requires_grad_(False)
        for module in self.chosen_modules(model):
            module.requires_grad_(True)
        return model

    def chosen_modules(self, model: nn.Module) -> list[nn.Module]:
        """The modules that train, logged by name."""
        blocks = transformer_blocks(model)
        count = min(self.config.blocks, len(blocks))
        chosen = self.blocks_in_order(model)[:count]
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
        if not chosen:  # with gradual unfreezing too: the optimizer needs something from the first step
            raise TunesmithError("method 'partial' trains nothing: set method.blocks > 0 or method.modules")
        logger.info("partial: %d of %d blocks train (%s)", count, len(blocks), self.config.blocks_from)
        return chosen

    def blocks_in_order(self, model: nn.Module) -> list[nn.Module]:
        """Blocks in the order they start training: from the output down for 'last', else from the input up."""
        blocks = list(transformer_blocks(model))
        return blocks[::-1] if self.config.blocks_from == "last" else blocks

    def bind_training(self, steps_per_epoch: int, total_steps: int) -> None:
        every = self.config.unfreeze_every
        if every is None:
            return
        self.steps_per_unfreeze = every * steps_per_epoch if self.config.unfreeze_unit == "epochs" else every
        planned = ", ".join(f"block {block} at step {step}" for step, block in self.unfreeze_schedule(total_steps))
        self.schedule_text = f"gradual unfreezing: {planned or 'no further block within the run'}"
        logger.info(self.schedule_text)

    def summary(self) -> str:
        return self.schedule_text

    def unfreeze_schedule(self, total_steps: int) -> list[tuple[int, str]]:
        """(step, block) pairs: when each further block starts training, within ``total_steps``."""
        schedule = []
        step = self.steps_per_unfreeze
        indices = list(range(self.num_blocks))
        order = indices[::-1] if self.config.blocks_from == "last" else indices
        for index in order[self.config.blocks:]:
            if step >= total_steps:
                break
            schedule.append((step, str(index)))
            step += self.steps_per_unfreeze
        return schedule

    def newly_trainable(self, model: nn.Module, step: int) -> list[nn.Parameter]:
        """The next block's parameters at each multiple of the unfreezing interval."""
        if self.config.unfreeze_every is None or step == 0 or step % self.steps_per_unfreeze:
            return []
        position = self.config.blocks + step // self.steps_per_unfreeze - 1
        blocks = self.blocks_in_order(model)
        if position >= len(blocks):
            return []
        parameters = [p for p in blocks[position].parameters() if not p.requires_grad]
        for parameter in parameters:
            parameter.requires_grad_(True)
        logger.info("gradual unfreezing: step %d, %d more parameters train", step, sum(p.numel() for p in parameters))
        return parameters
