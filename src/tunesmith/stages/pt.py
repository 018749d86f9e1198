"""``stage: pt``: continued pre-training on plain text, the loss on every token; validation perplexity."""

from __future__ import annotations

from pathlib import Path

from tunesmith.config import DataSection
from tunesmith.data.encoded import EncodedData
from tunesmith.data.pretraining import encode_corpus
from tunesmith.stages.base import STAGES, Stage
from tunesmith.training.objective import Objective, TokenCrossEntropy
from tunesmith.training.speed import SpeedSetup


@STAGES.register_kind
class ContinuedPretraining(Stage):
    """Plain text in ``data.max_length`` blocks, no chat template; packed when ``train.speed.packing``."""

    kind = "pt"

    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        return encode_corpus(section, tokenizer, seed)

    def objective(self, speed: SpeedSetup) -> Objective:
        return TokenCrossEntropy(speed.token_loss, speed.collate_fn)
