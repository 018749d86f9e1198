"""``stage: cls``: sequence classification with a label head on a decoder or an encoder.

The head reads a causal LM's last real token, or an encoder's mean final hidden state (BERT,
all-MiniLM-L6-v2; see :func:`~tunesmith.stages.scoring.sequence_scores`). Metrics on held-out rows:
cross-entropy, accuracy, the accuracy of always answering the training data's majority class, and
for a causal LM the zero-shot label-word accuracy of the base model, measured once before training
(:mod:`tunesmith.stages.zero_shot`): the two baselines a classifier must beat. The result folder
holds the method's artifact, ``head.safetensors`` and ``labels.json`` (the label names in head order).
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
from tunesmith.core.errors import TunesmithError
from tunesmith.data.classification import EncodedText, cut, encode_classification, encode_text
from tunesmith.data.encoded import EncodedData
from tunesmith.inference.generate import load_for_inference
from tunesmith.methods.base import base_model_of, read_manifest
from tunesmith.models import is_encoder
from tunesmith.stages.base import STAGES, Stage
from tunesmith.stages.pairs import PairObjective, PairValues
from tunesmith.stages.scoring import add_head, count_sequences, head_of, load_head, save_head, sequence_scores
from tunesmith.stages.zero_shot import default_label_words, zero_shot_accuracy
from tunesmith.training.batching import collate
from tunesmith.training.speed import SpeedSetup

LABELS_FILE = "labels.json"


class ClassificationObjective(PairObjective):
    """Cross-entropy of the head's label scores, summed over examples (the units)."""

    counted = "examples"

    def __init__(self, speed: SpeedSetup, majority: int, zero_shot: Optional[float] = None) -> None:
        super().__init__(speed)
        self.majority = majority
        self.zero_shot = zero_shot

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

    def evaluate(self, model: nn.Module, examples, batch_size: int, pad_token_id: int, runtime) -> dict[str, float]:
        """Loss, accuracy, majority_accuracy, and zero_shot_accuracy where the base model was scored."""
        metrics = super().evaluate(model, examples, batch_size, pad_token_id, runtime)
        if self.zero_shot is not None:
            metrics["zero_shot_accuracy"] = self.zero_shot
        return metrics


@STAGES.register_kind
class SequenceClassification(Stage):
    """Text/label rows; a head with one output per label trains with whatever the method trains."""

    kind = "cls"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.labels: tuple[str, ...] = tuple(config.labels or ())
        self.majority: Optional[int] = None
        self.encoder = False
        self.zero_shot: Optional[float] = None
        self.zero_shot_note = ""
        self.tokenizer = None
        self.data: Optional[EncodedData] = None
        self.max_length = 0

    def check_model(self, model: nn.Module) -> None:
        """Any causal LM or encoder-only model: an encoder's texts get its own special tokens ([CLS] ... [SEP])."""
        self.encoder = is_encoder(model.config)

    def encode_data(self, section: DataSection, tokenizer, seed: int, cache: Path) -> EncodedData:
        config, columns = self.config, section.columns
        text_field = columns.prompt if columns else config.text_field  # data.columns, where given, names them
        label_field = columns.label or columns.answer if columns else config.label_field
        data, self.labels = encode_classification(section, tokenizer, seed, text_field, label_field,  # type: ignore[arg-type]
                                                   config.labels, self.encoder)
        self.majority = Counter(example.label for example in data.train).most_common(1)[0][0]
        self.tokenizer, self.data, self.max_length = tokenizer, data, section.max_length
        return data

    def adapt_model(self, model: nn.Module) -> nn.Module:
        """Measure the zero-shot baseline on the untouched base model, then add the label head."""
        self.zero_shot, self.zero_shot_note = self.measure_zero_shot(model)
        return add_head(model, len(self.labels))

    def measure_zero_shot(self, model: nn.Module) -> tuple[Optional[float], str]:
        """(zero-shot label-word accuracy on the validation split, the line for the run's log); None where it
        does not apply. Every process scores every row (same model, same number)."""
        config, validation = self.config, (self.data.validation if self.data is not None else None)
        words = config.label_words or default_label_words(self.labels)
        if not config.zero_shot:
            return None, ""
        if self.encoder:
            return None, "zero-shot label-word baseline: does not apply to an encoder (it has no language-model head)"
        if not validation:
            return None, "zero-shot label-word baseline: needs a validation split (data.validation)"
        if words is None:
            return None, (f"zero-shot label-word baseline: the labels {list(self.labels)} are not words; name one word "
                          "per label in stage.label_words to measure it")
        if len(words) != len(self.labels):
            raise TunesmithError(f"stage.label_words has {len(words)} words for the {len(self.labels)} labels "
                                 f"{list(self.labels)}; give one word per label, in that order")
        template = config.zero_shot_prompt.format(text="", labels=" or ".join(words))
        tokenizer = self.tokenizer
        overhead = len(tokenizer(template)["input_ids"]) + max(len(tokenizer(" " + w)["input_ids"]) for w in words)
        accuracy = zero_shot_accuracy(model, tokenizer, [e.text for e in validation], [e.label for e in validation],
                                      words, config.zero_shot_prompt, self.max_length + overhead)  # texts as trained
        return accuracy, (f"zero-shot label-word baseline of the base model ({', '.join(words)}): accuracy "
                          f"{accuracy:.3f} on {len(validation)} validation rows")

    def notes(self) -> list[str]:
        return [self.zero_shot_note] if self.zero_shot_note else []

    def after_method(self, model: nn.Module) -> None:
        head_of(model).requires_grad_(True)

    def save(self, model: nn.Module, directory: Path) -> None:
        save_head(model, directory)
        (directory / LABELS_FILE).write_text(json.dumps(list(self.labels)) + "\n")

    def manifest_entries(self) -> dict:
        return {**super().manifest_entries(), "majority_label": self.labels[self.majority]}  # eval's baseline

    def objective(self, speed: SpeedSetup) -> ClassificationObjective:
        return ClassificationObjective(speed, self.majority, self.zero_shot)


def load_classifier(folder: str | Path, device: str = "cpu", dtype: str = "float32"):
    """The classifier in a result folder of ``stage: cls``: (model, tokenizer, label names)."""

    folder = Path(folder)
    manifest = read_manifest(folder)
    model, tokenizer = load_for_inference(manifest["base_model"], str(folder), dtype, device)
    return load_head(model, folder).eval(), tokenizer, json.loads((folder / LABELS_FILE).read_text())


def label_probabilities(model: nn.Module, tokenizer, texts: list[str], max_length: int = 1024) -> torch.Tensor:
    """Each text's probability of each label, (texts, labels), encoded as in training."""
    return head_scores(model, tokenizer, texts, max_length).softmax(-1)


@torch.no_grad()
def head_scores(model: nn.Module, tokenizer, texts: list[str], max_length: int = 1024) -> torch.Tensor:
    """The head's raw scores of each text, (texts, outputs), encoded as in training (a reward model: one output)."""

    encoder = is_encoder(base_model_of(model).config)
    examples = [EncodedText(cut(encode_text(tokenizer, text, encoder), max_length, encoder), 0).example
                for text in texts]
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in collate(examples, tokenizer.pad_token_id).items()}
    return sequence_scores(model, batch).float().cpu()


def classify(model: nn.Module, tokenizer, texts: list[str], labels: list[str], max_length: int = 1024) -> list[str]:
    """The predicted label of each text, encoded as in training."""
    return [labels[i] for i in label_probabilities(model, tokenizer, texts, max_length).argmax(-1).tolist()]
