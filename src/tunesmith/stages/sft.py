"""``stage: sft``: supervised tuning, next-token cross-entropy on the trained tokens."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import DataSection
from tunesmith.data import encode_data
from tunesmith.data.encoded import EncodedData
from tunesmith.stages.base import STAGES, Stage
from tunesmith.training.objective import Objective, TokenCrossEntropy
from tunesmith.training.speed import SpeedSetup


@STAGES.register_kind
class SupervisedFineTuning(Stage):
    """Conversations, instructions or text; loss on assistant tokens (or all, by ``data.train_on``)."""

    kind = "sft"

    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        return encode_data(section, tokenizer, seed, cache)

    def objective(self, speed: SpeedSetup) -> Objective:
        return TokenCrossEntropy(speed.token_loss, speed.collate_fn)
