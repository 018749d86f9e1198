"""The base of every recipe section: frozen, typed, unknown keys forbidden."""

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict


class Section(BaseModel):
    """A recipe section. ``lora_rnak: 8`` is an error naming the key, never a silent default.

    ``inf`` and ``nan`` are refused in every number field (``lr: .inf`` once trained into NaN weights).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _compiles(value: str) -> str:
    try:
        re.compile(value)
    except re.error as error:
        raise ValueError(f"not a valid regular expression ({error})") from None
    return value


Regex = Annotated[str, AfterValidator(_compiles)]
"""A field holding a regular expression, compiled when the recipe is read (one sentence when it does not compile)."""
