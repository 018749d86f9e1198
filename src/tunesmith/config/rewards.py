"""Reward sections of the online-RL stage (``stage.rewards``), one per ``kind``.

Every reward scores a completion of a prompt (given its reference answer, where the data has one);
several are combined as a weighted sum and each is logged on its own under its ``name``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import Field, field_validator

from tunesmith.config.base import Regex, Section

GSM8K_ANSWER = r"####\s*(-?[\d,]*\.?\d+)"


class RewardBase(Section):
    """What every reward has: its weight in the sum and the name it is logged under."""

    weight: float = Field(1.0, description="Weight of this reward in the sum that the advantages are computed from.")
    name: Optional[str] = Field(None, description="Name in logs and metrics (default: the kind; a function's module:name).")


class ExactMatchReward(RewardBase):
    """1 when the completion equals the reference answer (whitespace and case ignored), else 0."""

    kind: Literal["exact_match"] = "exact_match"
    case_sensitive: bool = Field(False, description="Compare letter case too.")


class AnswerMatchReward(RewardBase):
    """1 when the answer extracted by ``pattern`` from the completion equals the reference's, else 0.

    Evaluation's rule (``tunesmith.data.answers``): the last match of ``pattern``, else the last number
    in the text; the reference's answer the same way, else the whole reference. Numbers compare as
    numbers (``1,000`` = ``1000.0``). Pair it with a ``format`` reward to require the pattern itself.
    """

    kind: Literal["answer_match"] = "answer_match"
    pattern: Regex = Field(GSM8K_ANSWER, description="Regular expression; its first group (or the match) is the answer.")


class FormatReward(RewardBase):
    """1 when the completion has the required form (the regular expression matches), else 0."""

    kind: Literal["format"] = "format"
    pattern: Regex = Field(..., description="Regular expression the completion must match.")
    match: Literal["search", "full"] = Field("search", description="Anywhere in the completion, or the whole of it.")


class LengthReward(RewardBase):
    """A length penalty: 0 within ``tolerance`` tokens of ``target``, falling linearly to -1 at twice ``target``."""

    kind: Literal["length"] = "length"
    target: int = Field(..., ge=1, description="Completion length (tokens) that is not penalised.")
    tolerance: int = Field(0, ge=0, description="Tokens either side of the target that cost nothing.")


class FunctionReward(RewardBase):
    """A Python function named ``module:function``, called as ``f(prompts=, completions=, references=, ...)``."""

    kind: Literal["function"] = "function"
    function: str = Field(..., description="module:function, importable from the working directory or PYTHONPATH.")

    @field_validator("function")
    @classmethod
    def _module_colon_function(cls, value: str) -> str:
        module, sep, name = value.partition(":")
        if not (module and sep and name.isidentifier()):
            raise ValueError("must look like module:function (e.g. my_rewards:score)")
        return value


class ModelReward(RewardBase):
    """The scalar score of a reward model: a result of ``stage: rm``, or a sequence-classification folder."""

    kind: Literal["model"] = "model"
    path: str = Field(..., description="A stage: rm run or result folder (head.safetensors), or a folder that "
                      "AutoModelForSequenceClassification loads with one output (itself or its model/).")
    batch_size: int = Field(16, ge=1, description="Completions scored together.")
    max_length: int = Field(1024, ge=8, description="Longest prompt + completion scored (tokens; longer are cut).")


RewardSection = Annotated[
    Union[ExactMatchReward, AnswerMatchReward, FormatReward, LengthReward, FunctionReward, ModelReward],
    Field(discriminator="kind"),
]
REFERENCE_KINDS = ("exact_match", "answer_match")
"""Rewards that compare with a reference answer (the data must have one; they give ``accuracy``)."""
