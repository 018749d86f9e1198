"""Recipe sections of the training stages, one per ``stage.kind``.

A stage says what a batch is and how its loss and metrics are computed (supervised tuning's token
cross-entropy; pairwise, preference and policy-gradient losses next). Adding a stage adds its
section here and an implementation registered under the same ``kind`` in :mod:`tunesmith.stages`.
``stage: sft`` in a recipe is short for ``stage: {kind: sft}``.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import Field

from tunesmith.config.base import Section


class SftStage(Section):
    """Supervised fine-tuning: next-token cross-entropy on the trained tokens (data.train_on)."""

    kind: Literal["sft"] = "sft"


StageSection = Annotated[Union[SftStage], Field(discriminator="kind")]
