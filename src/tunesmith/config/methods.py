"""Recipe sections of the fine-tuning methods, one per ``method.kind``.

Each method owns its section; adding a method adds a section here and an implementation
registered under the same ``kind`` in :mod:`tunesmith.methods`.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, model_validator

from tunesmith.config.base import Section


class FullMethod(Section):
    """Full fine-tuning: every weight of the model trains."""

    kind: Literal["full"] = "full"


class PartialMethod(Section):
    """Partial fine-tuning: freeze everything except chosen transformer blocks and modules.

    With ``unfreeze_every`` set, training starts with ``blocks`` blocks (and ``modules``) and one
    more block becomes trainable every ``unfreeze_every`` steps or epochs (gradual unfreezing,
    Howard & Ruder 2018, https://arxiv.org/abs/1801.06146).
    """

    kind: Literal["partial"] = "partial"
    blocks: int = Field(2, ge=0, description="Number of transformer blocks that train (at the start, when unfreezing).")
    blocks_from: Literal["last", "first"] = Field(
        "last", description="Train the last (next to the output) or the first N blocks."
    )
    modules: tuple[str, ...] = Field(
        (),
        description="Extra modules that train, by name as in model.named_modules() "
        "(e.g. 'lm_head', 'model.norm'); a name also matches as a dotted suffix.",
    )
    unfreeze_every: Optional[int] = Field(
        None, ge=1, description="Gradual unfreezing: one more block trains every N units (null: off)."
    )
    unfreeze_unit: Literal["steps", "epochs"] = Field(
        "steps", description="Unit of unfreeze_every: optimizer steps or epochs."
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
    dora: bool = Field(
        False, description="DoRA: learn a magnitude per output and a LoRA direction (https://arxiv.org/abs/2402.09353)."
    )
    rslora: bool = Field(
        False, description="rsLoRA: scale the update by alpha / sqrt(r) instead of alpha / r (https://arxiv.org/abs/2312.03732)."
    )
    loraplus_lr_ratio: Optional[float] = Field(
        None, gt=0,
        description="LoRA+: learning rate of the B matrices = train.lr × this ratio, e.g. 16 "
        "(https://arxiv.org/abs/2402.12354); null: one learning rate.",
    )
    init: Literal["default", "loftq"] = Field(
        "default",
        description="How the update starts: default (B = 0, the adapted model equals the base) or loftq (with "
        "model.quantize: nf4: B·A starts as the best rank-r approximation of the base's 4-bit rounding error, "
        "https://arxiv.org/abs/2310.08659; docs/quantization.md).",
    )


class Ia3Method(Section):
    """IA3 through peft: learned vectors that rescale keys, values and the feed-forward input."""

    kind: Literal["ia3"] = "ia3"
    targets: Optional[tuple[str, ...]] = Field(
        None, description="Modules whose output (or input, for feed_forward) is rescaled; null: peft's default "
        "for the architecture (Llama: k_proj, v_proj, down_proj).",
    )
    feed_forward: Optional[tuple[str, ...]] = Field(
        None, description="Which of the targets are feed-forward layers (rescaled on their input); "
        "null: peft's default (Llama: down_proj).",
    )


class AdapterMethod(Section):
    """Bottleneck adapters (our own code: peft has none): down-projection, non-linearity, up-projection, residual."""

    kind: Literal["adapter"] = "adapter"
    placement: Literal["houlsby", "pfeiffer"] = Field(
        "houlsby", description="houlsby: after attention and after the feed-forward block; pfeiffer: after "
        "the feed-forward block only.",
    )
    reduction_factor: Optional[int] = Field(
        16, ge=1, description="Bottleneck size = hidden size / this factor (ignored when bottleneck is set)."
    )
    bottleneck: Optional[int] = Field(None, ge=1, description="Bottleneck size; overrides reduction_factor.")
    activation: Literal["relu", "gelu", "silu", "tanh"] = Field("relu", description="Non-linearity in the bottleneck.")
    attention_module: str = Field("self_attn", description="Name of the attention sub-module inside each block.")
    feed_forward_module: str = Field("mlp", description="Name of the feed-forward sub-module inside each block.")

    @model_validator(mode="after")
    def _size_given(self) -> "AdapterMethod":
        if self.bottleneck is None and self.reduction_factor is None:
            raise ValueError("set method.bottleneck or method.reduction_factor")
        return self


class PrefixMethod(Section):
    """Prefix tuning through peft: trainable key/value prefixes in every layer."""

    kind: Literal["prefix"] = "prefix"
    virtual_tokens: int = Field(20, ge=1, le=512, description="Length of the prefix.")
    projection: bool = Field(
        False, description="Reparameterise the prefix through an MLP during training (Li & Liang, 2021)."
    )
    projection_hidden: int = Field(512, ge=1, description="Hidden size of that MLP.")


class PromptMethod(Section):
    """Prompt tuning through peft: trainable virtual-token embeddings prepended to the input."""

    kind: Literal["prompt"] = "prompt"
    virtual_tokens: int = Field(20, ge=1, le=512, description="Number of virtual tokens.")
    init_text: Optional[str] = Field(
        None, description="Initialise from the embeddings of this text (repeated to fill); null: random."
    )


class PTuningMethod(Section):
    """P-tuning through peft: virtual tokens produced by a small prompt encoder."""

    kind: Literal["ptuning"] = "ptuning"
    virtual_tokens: int = Field(20, ge=1, le=512, description="Number of virtual tokens.")
    encoder: Literal["mlp", "lstm"] = Field("mlp", description="Prompt encoder: an MLP or a bidirectional LSTM.")
    encoder_hidden: int = Field(128, ge=1, description="Hidden size of the prompt encoder.")


MethodSection = Annotated[
    Union[FullMethod, PartialMethod, LoraMethod, Ia3Method, AdapterMethod, PrefixMethod, PromptMethod, PTuningMethod],
    Field(discriminator="kind"),
]
