"""Reading a trained result back: one function for inference, export and evaluation.

A *result* is what a run saved: a run folder (holding ``adapter/`` or ``model/``), the ``adapter/``
folder itself (a tunesmith manifest, or a plain ``peft`` adapter written by another tool), or a
complete model folder (a full fine-tune, or a merged export). :func:`load_result` accepts any of
these, and also a bare model name (alias, hub id), and returns the base model's name, the method
that trained it, the loaded model and its tokenizer (carrying the chat template of training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from tunesmith.config import ModelSection
from tunesmith.config.loader import validate_method
from tunesmith.core.errors import TunesmithError
from tunesmith.core.run_files import RunLayout
from tunesmith.core.runtime import cache_dir
from tunesmith.data.templates import resolve_template
from tunesmith.methods import MANIFEST, Method, build_method
from tunesmith.methods.base import read_manifest
from tunesmith.models import load_model, load_tokenizer, resolve_model_path
from tunesmith.models.loading import load_dequantised

PEFT_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class ResultFolder:
    """Where a result lies and what it is, before anything is loaded.

    Attributes:
        folder: The folder holding the weights (a run's ``adapter/`` or ``model/``, or the path given).
        kind: ``adapter`` (needs a base model) or ``model`` (complete).
        manifest: The ``tunesmith.json`` tunesmith wrote beside the result, or None.
        run_dir: The run folder when one was given (its ``metrics.jsonl`` has the loss curve).
    """

    folder: Path
    kind: str
    manifest: Optional[dict] = None
    run_dir: Optional[Path] = None

    @property
    def recorded_base(self) -> Optional[str]:
        """The base model the manifest (or a plain peft adapter's config) names."""
        if self.manifest is not None:
            return self.manifest.get("base_model")
        if (self.folder / PEFT_CONFIG).is_file():
            return json.loads((self.folder / PEFT_CONFIG).read_text()).get("base_model_name_or_path")
        return None

    def method(self) -> Optional[Method]:
        """The method that wrote the result, from its manifest (None for folders tunesmith did not write)."""
        if self.manifest is None:
            return None
        return build_method(validate_method(self.manifest["config"], source=str(self.folder / MANIFEST)))


@dataclass(frozen=True)
class LoadedResult:
    """A result loaded and ready to generate.

    Attributes:
        base_model: Name of the base model (for a complete model folder: the folder itself unless
            its manifest records the base it was trained from).
        method: The method that trained it, or None for a plain model or a foreign peft adapter.
        model: The model in eval mode (base + adapter for adapter results).
        tokenizer: Its tokenizer, with the chat template used in training.
        location: Where the result was found.
    """

    base_model: str
    method: Optional[Method]
    model: Any
    tokenizer: Any
    location: Optional[ResultFolder] = field(default=None)


def locate_result(path: str | Path) -> Optional[ResultFolder]:
    """Recognise a run folder, an adapter folder or a model folder; None for anything else.

    Raises:
        TunesmithError: If ``path`` is a folder that holds neither weights nor a manifest.
    """
    folder = Path(path)
    if not folder.is_dir():
        return None
    run_dir = None
    for artifact in RunLayout.RESULTS:
        if (folder / artifact).is_dir() and any((folder / artifact / name).is_file()
                                                for name in (MANIFEST, "config.json", PEFT_CONFIG)):
            run_dir, folder = folder, folder / artifact
            break
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if (folder / "config.json").is_file():
        return ResultFolder(folder, "model", manifest, run_dir)
    if manifest is not None or (folder / PEFT_CONFIG).is_file():
        return ResultFolder(folder, "adapter", manifest, run_dir)
    raise TunesmithError(f"{folder} is not a trained result: it has neither {MANIFEST}, {PEFT_CONFIG} nor config.json; "
                         "give a run folder, its adapter/ or model/ folder, or a model folder")


def quantises_base(source: str | Path) -> bool:
    """Whether :func:`load_result` quantises a base through bitsandbytes to load ``source`` (a QLoRA run's result,
    rebuilt over the rounded weights it learned against)."""
    location = locate_result(source)
    return location is not None and bool((location.manifest or {}).get("quantized_base"))


def load_result(source: str | Path, base_model: Optional[str] = None, dtype: str = "float32",
                device: torch.device | str = "cpu", trust_remote_code: bool = False) -> LoadedResult:
    """Load a run folder, an adapter folder, a model folder or a model name, ready to generate.

    Args:
        source: A run folder, its ``adapter/`` or ``model/``, any model folder, or an alias / hub id.
        base_model: Base model for an adapter; default: the one its manifest records.
        dtype: ``float32``, ``bfloat16``, ``float16`` or ``auto``.

    Returns:
        The base model's name, the method, the model (eval mode) and its tokenizer.

    Raises:
        TunesmithError: If an adapter's base model is neither given nor recorded, or loading fails.
    """
    location = locate_result(source)
    name = str(source) if location is None else str(location.folder)
    section = ModelSection(name=name, dtype=dtype, trust_remote_code=trust_remote_code)
    if location is None or location.kind == "model":
        model_path = resolve_model_path(name, cache_dir())
        model = load_model(model_path, section, device)
        recorded = location.recorded_base if location is not None else None
        method = location.method() if location is not None else None
        return LoadedResult(recorded or name, method, model.eval(), _tokenizer(model_path, section), location)
    base = base_model or location.recorded_base
    if base is None:
        raise TunesmithError(f"{location.folder} is an adapter without a recorded base model; give the base model "
                             "(--model)")
    base_path = resolve_model_path(base, cache_dir())
    trained_over = (location.manifest or {}).get("quantized_base")  # QLoRA: the rounded weights it learned against
    base_section = section.model_copy(update={"name": base})
    model = (load_dequantised(base_path, base_section, trained_over, device) if trained_over
             else load_model(base_path, base_section, device))
    method = location.method()
    model = load_trained(model, location.folder, base, method)
    tokenizer_path = str(location.folder) if (location.folder / "tokenizer_config.json").is_file() else base_path
    return LoadedResult(base, method, model.eval(), _tokenizer(tokenizer_path, section), location)


def load_trained(base_model: torch.nn.Module, folder: Path, model_name: Optional[str] = None,
                 method: Optional[Method] = None) -> torch.nn.Module:
    """Put the result in ``folder`` onto ``base_model`` with the method that wrote it (or plain peft).

    Args:
        model_name: How the base model was named (alias, hub id or folder), compared with the
            manifest's ``base_model``; None compares only the shapes.
        method: The method, when the caller has already read it from the manifest.

    Raises:
        TunesmithError: If the result was trained on another base model.
    """
    folder = Path(folder)
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if manifest is not None:
        check_base_model(manifest, base_model, model_name, folder)
        method = method or ResultFolder(folder, "adapter", manifest).method()
    try:
        if method is not None:
            return method.load(base_model, folder)
        from peft import PeftModel  # a plain peft adapter written by another tool

        return PeftModel.from_pretrained(base_model, folder)
    except RuntimeError as error:
        if "size mismatch" not in str(error):
            raise
        needed = (manifest or {}).get("base_model", "the model it was trained on")
        raise TunesmithError(f"{folder} does not fit this base model: its weights have other shapes; "
                             f"load it with --model {needed}") from None


BASE_SHAPE_KEYS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def base_shape(model: torch.nn.Module) -> dict:
    """What an adapter depends on in its base model's config (type, hidden size, vocabulary, layers)."""
    config = getattr(model, "config", None)
    return {key: getattr(config, key, None) for key in BASE_SHAPE_KEYS}


def _same_model_name(recorded: str, given: str) -> Optional[bool]:
    """Whether two model names mean the same model; None when that cannot be told without loading."""
    if recorded == given:
        return True
    recorded_path, given_path = Path(recorded).expanduser(), Path(given).expanduser()
    if recorded_path.is_dir() and given_path.is_dir():
        return recorded_path.resolve() == given_path.resolve()
    if recorded_path.is_dir() or given_path.is_dir():  # a folder against an alias or hub id
        return None
    return False


def check_base_model(manifest: dict, model: torch.nn.Module, model_name: Optional[str], folder: Path) -> None:
    """Refuse a result trained on another base model than ``model`` (named ``model_name``).

    The config shape recorded at training (``base_config``) must match; so must the name, where two
    names can be compared without loading anything (two folders, or two aliases/hub ids).

    Raises:
        TunesmithError: Saying which base model the result needs.
    """
    needed = manifest.get("base_model")
    recorded = manifest.get("base_config") if isinstance(manifest.get("base_config"), dict) else {}
    actual = base_shape(model)
    differences = [f"{key} {recorded[key]} there, {actual[key]} here" for key in BASE_SHAPE_KEYS
                   if recorded.get(key) is not None and actual.get(key) is not None and recorded[key] != actual[key]]
    if differences:
        given = model_name or "this model"
        raise TunesmithError(f"{folder} was trained on base model {needed}, which differs from {given} "
                             f"({', '.join(differences)}); load it with --model {needed}")
    if needed and model_name and _same_model_name(str(needed), model_name) is False:
        raise TunesmithError(f"{folder} was trained on base model {needed}, not {model_name}; "
                             f"load it with --model {needed}")


def _tokenizer(path: str, section: ModelSection):
    tokenizer = load_tokenizer(path, section)
    resolve_template(tokenizer, "auto")
    return tokenizer
