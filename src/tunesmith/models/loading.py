"""Loading a causal language model and its tokenizer: by alias, hub id or local folder."""

from __future__ import annotations

from pathlib import Path

import torch

from tunesmith.config import ModelSection
from tunesmith.errors import TunesmithError
from tunesmith.models.aliases import ALIASES
from tunesmith.registry import did_you_mean

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_model_path(name: str, cache: Path) -> str:
    """Turn an alias, a local folder or a hub id into what ``from_pretrained`` takes.

    Raises:
        TunesmithError: For a local folder without weights, or a bare name that is neither an
            alias nor a folder (hub ids have the form owner/name).
    """
    if name in ALIASES:
        return str(ALIASES.get(name).materialise(cache))
    path = Path(name).expanduser()
    if path.is_dir():
        if not any(f.name.endswith(WEIGHT_SUFFIXES) for f in path.iterdir()):
            raise TunesmithError(
                f"model folder {path} has no weights (*.safetensors or *.bin); point model.name at a "
                "folder written by save_pretrained"
            )
        return str(path)
    if path.exists():
        raise TunesmithError(f"model.name {name} is a file; give the folder that holds it")
    if "/" not in name:
        hint = did_you_mean(name, ALIASES.names())
        raise TunesmithError(
            f"unknown model alias '{name}'.{hint} Built-in aliases: {', '.join(ALIASES.names())}; "
            "otherwise give a hub id (owner/name) or a local folder"
        )
    return name


def load_tokenizer(path: str, section: ModelSection):
    """The tokenizer, with a padding token (the EOS token when the model has none)."""
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, path, section)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(path: str, section: ModelSection, device: torch.device | str = "cpu"):
    """The causal LM in the recipe's dtype, on ``device``, in training mode off (eval)."""
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(AutoModelForCausalLM, path, section, dtype=DTYPES[section.dtype])
    return model.to(device).eval()


def _from_pretrained(factory, path: str, section: ModelSection, **kwargs):
    try:
        return factory.from_pretrained(
            path, trust_remote_code=section.trust_remote_code, revision=section.revision, **kwargs
        )
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TunesmithError(f"could not load model '{section.name}' from {path}: {first_line}") from None


def load_model_and_tokenizer(section: ModelSection, cache: Path, device: torch.device | str = "cpu"):
    """Resolve ``section.name`` and load both the model and its tokenizer."""
    path = resolve_model_path(section.name, cache)
    return load_model(path, section, device), load_tokenizer(path, section)
