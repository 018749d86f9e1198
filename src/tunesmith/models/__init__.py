"""Models: built-in aliases and loading by alias, hub id or local folder."""

from tunesmith.models.aliases import ALIASES, ModelAlias
from tunesmith.models.loading import (
    is_encoder,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)

__all__ = ["ALIASES", "ModelAlias", "is_encoder", "load_model", "load_model_and_tokenizer", "load_tokenizer", "resolve_model_path"]
