"""``stage: rm``: a reward model, a scalar head on the model trained with the pairwise Bradley-Terry loss.

The result folder is the method's artifact plus ``head.safetensors``; :func:`load_reward_model`
loads it back as a scorer of conversations (what the online stages use as their reward).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tunesmith.config import DataSection
from tunesmith.data.encode import EncodedExample
from tunesmith.data.encoded import EncodedData
from tunesmith.data.preference import PREFERENCE_LAYOUT, encode_judged, encode_pairs, encode_reply
from tunesmith.inference.generate import load_for_inference
from tunesmith.methods.base import read_manifest
from tunesmith.stages.base import STAGES, Stage
from tunesmith.stages.losses import bradley_terry
from tunesmith.stages.pairs import PairObjective, PairValues, split_pairs
from tunesmith.stages.scoring import add_head, head_of, load_head, save_head, sequence_scores
from tunesmith.training.batching import collate
from tunesmith.training.speed import SpeedSetup


class RewardObjective(PairObjective):
    """``-log sigmoid(r(chosen) - r(rejected) - margin)`` per pair; accuracy is r(chosen) > r(rejected)."""

    def __init__(self, speed: SpeedSetup, margin: float) -> None:
        super().__init__(speed)
        self.margin = margin

    def per_pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PairValues:
        chosen, rejected = split_pairs(sequence_scores(model, batch)[:, 0])
        gap = chosen - rejected
        return bradley_terry(chosen, rejected, self.margin), {
            "accuracy": (gap > 0).float(), "margin": gap.detach(), "chosen_reward": chosen.detach(),
            "rejected_reward": rejected.detach()}


@STAGES.register_kind
class RewardModelling(Stage):
    """Preference pairs; the model gains a scalar head that trains with whatever the method trains."""

    kind = "rm"

    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        return encode_judged(section, tokenizer, seed, self.kind, PREFERENCE_LAYOUT, encode_pairs)

    def adapt_model(self, model: nn.Module) -> nn.Module:
        return add_head(model, 1)

    def after_method(self, model: nn.Module) -> None:
        head_of(model).requires_grad_(True)

    def save(self, model: nn.Module, directory: Path) -> None:
        save_head(model, directory)

    def objective(self, speed: SpeedSetup) -> RewardObjective:
        return RewardObjective(speed, self.config.margin)


def load_reward_model(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The reward model in a result folder of ``stage: rm`` (base model + method result + head).

    Returns:
        (model, tokenizer), the model in eval mode; score with :func:`score_conversations`.
    """

    manifest = read_manifest(Path(folder))
    model, tokenizer = load_for_inference(manifest["base_model"], str(folder), dtype, device)
    return load_head(model, Path(folder)).eval(), tokenizer


@torch.no_grad()
def score_conversations(model: nn.Module, tokenizer, conversations: list[list[dict[str, str]]],
                        max_length: int = 1024) -> list[float]:
    """The reward of each conversation's final assistant reply, encoded exactly as in training."""
    examples = []
    for conversation in conversations:
        reply = encode_reply(tokenizer, conversation[:-1], conversation[-1]["content"]).example(max_length)
        examples.append(EncodedExample(reply.input_ids, reply.labels))
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    return sequence_scores(model, batch)[:, 0].tolist()
