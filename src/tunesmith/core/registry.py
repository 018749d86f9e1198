"""One small registry per extension point (methods, data formats, templates, metrics).

Names are registered explicitly; a duplicate or an unknown name fails loudly and lists the valid
ones, so a typo in a recipe never falls back to a default silently.
"""

from __future__ import annotations

import re
from typing import Callable, Generic, Iterable, Iterator, Optional, TypeVar

from tunesmith.core.errors import TunesmithError

T = TypeVar("T")


# What other fine-tuning tools (peft, transformers, axolotl, LLaMA-Factory) call our keys, so a user
# who writes theirs (or a typo of theirs, such as ``lora_rnak``) is pointed at ours.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target": "targets", "lora_target_modules": "targets",
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "micro_batch_size": "batch_size", "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "gradient_accumulation": "grad_accum",
    "max_seq_length": "max_length", "sequence_len": "max_length", "cutoff_len": "max_length",
    "max_seq_len": "max_length", "output_dir": "dir", "model_name": "name", "base_model": "name",
    "dataset": "train", "datasets": "train", "warmup": "warmup_steps", "lr_scheduler_type": "schedule",
}


def edit_distance(a: str, b: str) -> int:
    """Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of neighbours.

    Written here (a dozen lines) because difflib has no edit distance and a swap (``rnak``/``rank``)
    must count as one typo; no dependency for it.
    """
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i] + [0] * len(b)
        for j, char_b in enumerate(b, start=1):
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b))
            if i > 1 and j > 1 and char_a == b[j - 2] and a[i - 2] == char_b:
                current[j] = min(current[j], previous2[j - 2] + 1)
        previous2, previous = previous, current
    return previous[len(b)]


def nearest_name(name: str, choices: Iterable[str]) -> Optional[str]:
    """The choice a user most likely meant by ``name``, or None when none is close.

    ``name`` is compared whole and by its last ``_``-separated words (``lora_rnak`` -> ``rnak``), with
    each choice and the names other tools use for it (:data:`SYNONYMS`), by edit distance; a
    choice that ``name`` begins (``smollm2`` -> ``smollm2-135m-instruct``) counts as close too.
    """
    choices = list(dict.fromkeys(choices))
    spellings = [(choice, choice, 0) for choice in choices]
    spellings += [(alias, target, 1) for alias, target in SYNONYMS.items() if target in choices]
    lowered = name.lower()
    words = [word for word in re.split(r"[_.\-\s]+", lowered) if word]
    variants = {lowered, *("_".join(words[i:]) for i in range(1, len(words)))}
    ranked = []
    for spelling, choice, is_alias in spellings:
        for variant in variants:
            distance = edit_distance(variant, spelling.lower())
            allowed = max(1, len(spelling) // 3)
            if distance <= allowed and distance < max(len(spelling), len(variant)):
                ranked.append((distance, is_alias, variant != lowered, choice))
    if ranked:
        return min(ranked)[3]
    starts = [choice for choice in choices if len(lowered) >= 3 and choice.lower().startswith(lowered)]
    return starts[0] if len(starts) == 1 else None


def did_you_mean(name: str, choices: list[str]) -> str:
    """Return a " Did you mean 'x'?" hint for the nearest choice (:func:`nearest_name`), or an empty string."""
    close = nearest_name(name, choices)
    return f" Did you mean '{close}'?" if close else ""


class Registry(Generic[T]):
    """Maps names to objects of one kind.

    Args:
        kind: What is registered ("method", "data format", ...), used in error messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers an object under ``name``.

        Raises:
            ValueError: If ``name`` is already registered (a programming error, not a user one).
        """

        def decorator(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return decorator

    def register_kind(self, obj: T) -> T:
        """Decorator that registers a class under its own ``kind`` attribute (the name is written once)."""
        return self.register(obj.kind)(obj)

    def get(self, name: str) -> T:
        """Return the object registered as ``name``.

        Raises:
            TunesmithError: If nothing is registered under that name; lists the valid names.
        """
        try:
            return self._entries[name]
        except KeyError:
            valid = ", ".join(sorted(self._entries))
            hint = did_you_mean(name, list(self._entries))
            raise TunesmithError(f"unknown {self.kind} '{name}'.{hint} Valid: {valid}.") from None

    def names(self) -> list[str]:
        """All registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
