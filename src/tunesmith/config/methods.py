"""Recipe sections of the fine-tuning methods, one per ``method.kind``.

Each method owns its section; adding a method adds a section here and an implementation
registered under the same ``kind`` in :mod:`tunesmith.methods`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from tunesmith.config.base import Section


class FullMethod(Section):
    """Full fine-tuning: every weight of the model trains."""

    kind: Literal["full"] = "full"


class PartialMethod(Section):
    """Partial fine-tuning: freeze everything except chosen transformer blocks and modules."""

    kind: Literal["partial"] = "partial"
    blocks: int = Field(2, ge=0, description="Number of transformer blocks that train.")
    blocks_from: Literal["last", "first"] = Field(
        "last", description="Train the last (next to the output) or the first N blocks."
    )
    modules: tuple[str, ...] = Field(
        (),
        description="Extra modules that train, by name as in model.named_modules() "
        "(e.g. 'lm_head', 'model.norm'); a name also matches as a dotted suffix.",
    )


class LoraMethod(Section):
    """LoRA through peft: a low-rank update B·A beside chosen linear layers."""

    kind: Literal["lora"] = "lora"
    r: int = Field(16, ge=1, description="Rank of the update.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    targets: Union[Literal["all-linear"], tuple[str, ...]] = Field(
        "all-linear",
        description="'all-linear' (every linear layer but the output head) or module names "
        "such as [q_proj, v_proj].",
    )


MethodSection = Annotated[Union[FullMethod, PartialMethod, LoraMethod], Field(discriminator="kind")]
