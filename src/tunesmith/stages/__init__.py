"""Training stages behind one contract (see :mod:`tunesmith.stages.base`).

Importing this package registers every built-in stage.
"""

from tunesmith.stages import cls, dpo, grpo, kto, orpo, pt, rm, sft  # noqa: F401  (registers the stages)
from tunesmith.stages.base import STAGES, Stage


def build_stage(config) -> Stage:
    """The stage object for a recipe's ``stage`` section."""
    return STAGES.get(config.kind)(config)


__all__ = ["STAGES", "Stage", "build_stage"]
