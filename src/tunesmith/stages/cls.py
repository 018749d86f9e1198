"""``stage: cls``: sequence classification with a label head on the model's last real token.

Metrics on held-out rows: cross-entropy, accuracy, and the accuracy of always answering the
training data's majority class (the baseline a classifier must beat). The result folder holds the
method's artifact, ``head.safetensors`` and ``labels.json`` (the label names in head order).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from tunesmith.config import DataSection
from tunesmith.data.classification import EncodedText, prepare_classification
from tunesmith.data.prepared import PreparedData
from tunesmith.stages.base import STAGES, Stage
from tunesmith.stages.pairs import PairObjective, PairValues
from tunesmith.stages.scoring import add_head, count_sequences, head_of, load_head, save_head, sequence_scores
from tunesmith.training.speed import SpeedSetup

LABELS_FILE = "labels.json"


class ClassificationObjective(PairObjective):
    """Cross-entropy of the head's label scores, summed over examples (the units)."""

    counted = "examples"

    def __init__(self, speed: SpeedSetup, majority: int) -> None:
        super().__init__(speed)
        self.majority = majority

    def collate(self, examples: list[EncodedText], pad_token_id: int) -> dict[str, torch.Tensor]:
        batch = self.collate_fn([example.example for example in examples], pad_token_id)
        batch["class_labels"] = torch.tensor([example.label for example in examples])
        return batch

    def units(self, batch: dict[str, torch.Tensor]) -> int:
        return count_sequences(batch)

    def per_pair(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> PairValues:
        scores = sequence_scores(model, batch)  # (examples, labels)
        labels = batch["class_labels"]
        loss = F.cross_entropy(scores, labels, reduction="none")
        return loss, {"accuracy": (scores.argmax(-1) == labels).float(),
                      "majority_accuracy": (labels == self.majority).float()}


@STAGES.register_kind
class SequenceClassification(Stage):
    """Text/label rows; a head with one output per label trains with whatever the method trains."""

    kind = "cls"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.labels: tuple[str, ...] = tuple(config.labels or ())
        self.majority: Optional[int] = None

    def prepare_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> PreparedData:
        config = self.config
        data, self.labels = prepare_classification(section, tokenizer, seed, config.text_field, config.label_field,
                                                   config.labels)
        self.majority = Counter(example.label for example in data.train).most_common(1)[0][0]
        return data

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return add_head(model, len(self.labels))

    def after_method(self, model: nn.Module) -> None:
        head_of(model).requires_grad_(True)

    def save(self, model: nn.Module, directory: Path) -> None:
        save_head(model, directory)
        (directory / LABELS_FILE).write_text(json.dumps(list(self.labels)) + "\n")

    def manifest_entries(self) -> dict:
        return {**super().manifest_entries(), "majority_label": self.labels[self.majority]}  # eval's baseline

    def objective(self, speed: SpeedSetup) -> ClassificationObjective:
        return ClassificationObjective(speed, self.majority)


def load_classifier(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The classifier in a result folder of ``stage: cls``: (model, tokenizer, label names)."""
    from tunesmith.inference import load_for_inference

    folder = Path(folder)
    manifest = json.loads((folder / "tunesmith.json").read_text())
    model, tokenizer = load_for_inference(manifest["base_model"], str(folder), dtype, device)
    return load_head(model, folder).eval(), tokenizer, json.loads((folder / LABELS_FILE).read_text())


@torch.no_grad()
def classify(model: nn.Module, tokenizer, texts: list[str], labels: list[str], max_length: int = 1024) -> list[str]:
    """The predicted label of each text, encoded as in training."""
    from tunesmith.training.batching import collate

    examples = []
    for text in texts:
        ids = [tokenizer.bos_token_id] * (tokenizer.bos_token_id is not None)
        ids += list(tokenizer(text.strip(), add_special_tokens=False)["input_ids"])
        examples.append(EncodedText(tuple(ids[:max_length]), 0).example)
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    return [labels[i] for i in sequence_scores(model, batch).argmax(-1).tolist()]
