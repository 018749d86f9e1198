"""The base of every recipe section: frozen, typed, unknown keys forbidden."""

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. ``lora_rnak: 8`` is an error naming the key, never a silent default.

    ``inf`` and ``nan`` are refused in every number field (``lr: .inf`` once trained into NaN weights).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)
