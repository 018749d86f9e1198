"""Loading a trained result and generating with it, using the chat template of training."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Iterator, Optional

import torch

from tunesmith.config import ModelSection
from tunesmith.data.encode import render_prompt
from tunesmith.errors import TunesmithError
from tunesmith.methods import MANIFEST, build_method
from tunesmith.methods.base import read_manifest
from tunesmith.models import load_model, load_tokenizer, resolve_model_path
from tunesmith.runtime import cache_dir


def load_for_inference(model_name: str, adapter: Optional[str] = None, dtype: str = "float32",
                       device: torch.device | str = "cpu", trust_remote_code: bool = False):
    """A model (base, or base + trained result) and its tokenizer, ready to generate.

    Args:
        model_name: Alias, hub id or folder of the base model (or of a full fine-tuned ``model/``).
        adapter: Folder of a trained adapter (``adapter/`` of a run), or None.

    Returns:
        ``(model, tokenizer)``; the tokenizer carries the chat template used in training.
    """
    section = ModelSection(name=model_name, dtype=dtype, trust_remote_code=trust_remote_code)
    path = resolve_model_path(model_name, cache_dir())
    model = load_model(path, section, device)
    tokenizer_path = path
    if adapter is not None:
        folder = Path(adapter)
        if not (folder / MANIFEST).is_file() and not (folder / "adapter_config.json").is_file():
            raise TunesmithError(f"{folder} is not a trained result: it has neither {MANIFEST} nor adapter_config.json")
        model = load_trained(model, folder, model_name)
        if (folder / "tokenizer_config.json").is_file():
            tokenizer_path = str(folder)
    tokenizer = load_tokenizer(tokenizer_path, section)
    from tunesmith.data.templates import resolve_template

    resolve_template(tokenizer, "auto")
    return model.eval(), tokenizer


def load_trained(base_model: torch.nn.Module, folder: Path, model_name: Optional[str] = None) -> torch.nn.Module:
    """Put the result in ``folder`` onto ``base_model`` with the method that wrote it.

    Args:
        model_name: How the base model was named (alias, hub id or folder), compared with the
            manifest's ``base_model``; None compares only the shapes.

    Raises:
        TunesmithError: If the result was trained on another base model.
    """
    manifest = read_manifest(folder) if (folder / MANIFEST).is_file() else None
    if manifest is not None:
        check_base_model(manifest, base_model, model_name, folder)
    try:
        if manifest is not None:
            from tunesmith.config.loader import validate_method

            method = build_method(validate_method(manifest["config"], source=str(folder / MANIFEST)))
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


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def _generation_kwargs(tokenizer, max_new_tokens: int, temperature: float) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": _stop_ids(tokenizer),
              "pad_token_id": tokenizer.pad_token_id, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    return kwargs


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 16) -> list[str]:
    """Replies to each conversation (greedy when temperature is 0), batched with left padding."""
    replies: list[str] = []
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    for start in range(0, len(conversations), batch_size):
        prompts = [render_prompt(tokenizer, c) for c in conversations[start : start + batch_size]]
        inputs = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        output = model.generate(**inputs, **_generation_kwargs(tokenizer, max_new_tokens, temperature))
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        replies += [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return replies


def stream_reply(model, tokenizer, conversation: list[dict[str, str]], max_new_tokens: int = 256,
                 temperature: float = 0.0) -> Iterator[str]:
    """Yield the reply to ``conversation`` piece by piece as it is generated."""
    from transformers import TextIteratorStreamer

    device = next(model.parameters()).device
    prompt = render_prompt(tokenizer, conversation)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(device)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = {**inputs, **_generation_kwargs(tokenizer, max_new_tokens, temperature), "streamer": streamer}
    thread = threading.Thread(target=lambda: torch.no_grad()(model.generate)(**kwargs), daemon=True)
    thread.start()
    yield from streamer
    thread.join()
