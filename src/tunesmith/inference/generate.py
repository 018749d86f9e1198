"""Loading a trained result and generating with it, using the chat template of training."""

from __future__ import annotations

import threading
from typing import Iterator, Optional

import torch

from tunesmith.core.errors import TunesmithError
from tunesmith.data.encode import render_prompt
from tunesmith.inference.compiled import compiled_step
from tunesmith.inference.decoding import LeanDecoder, Row, RowBatch, decode, supports_slots
from tunesmith.inference.quantized import quantized_twin
from tunesmith.inference.results import (
    LoadedResult,
    base_shape,
    check_base_model,
    load_result,
    load_trained,
    locate_result,
)
from tunesmith.methods import MANIFEST

__all__ = ["LoadedResult", "base_shape", "check_base_model", "generate", "load_for_inference", "load_result", "load_trained", "stream_reply"]


def load_for_inference(model_name: str, adapter: Optional[str] = None, dtype: str = "float32",
                       device: torch.device | str = "cpu", trust_remote_code: bool = False):
    """A model (base, or base + trained result) and its tokenizer, ready to generate.

    A thin wrapper over :func:`tunesmith.inference.results.load_result`.

    Args:
        model_name: Alias, hub id or folder of the base model (or of a full fine-tuned ``model/``).
        adapter: Folder of a trained adapter (``adapter/`` of a run, or the run folder), or None.

    Returns:
        ``(model, tokenizer)``; the tokenizer carries the chat template used in training.
    """
    if adapter is None:
        loaded = load_result(model_name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    else:
        if locate_result(adapter) is None:
            raise TunesmithError(f"{adapter} is not a trained result: it has neither {MANIFEST} nor adapter_config.json")
        loaded = load_result(adapter, model_name, dtype, device, trust_remote_code)
    return loaded.model, loaded.tokenizer


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end a reply: EOS and the chat templates' end-of-turn markers the vocabulary has."""
    ids = {tokenizer.eos_token_id}
    for token in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return sorted(i for i in ids if i is not None)


def _generation_kwargs(tokenizer, max_new_tokens: int, temperature: float) -> dict:
    kwargs = {"max_new_tokens": max_new_tokens, "eos_token_id": stop_token_ids(tokenizer),
              "pad_token_id": tokenizer.pad_token_id, "do_sample": temperature > 0}
    if temperature > 0:
        kwargs["temperature"] = temperature
    return kwargs


@torch.no_grad()
def generate(model, tokenizer, conversations: list[list[dict[str, str]]], max_new_tokens: int = 128,
             temperature: float = 0.0, batch_size: int = 16, compile: bool = False,
             quantize: Optional[str] = None) -> list[str]:
    """Replies to each conversation (greedy when temperature is 0), up to ``batch_size`` decoded together.

    Decodes through :func:`tunesmith.inference.decoding.decode` (rows leave as they finish, waiting ones join);
    sampling uses the model's generation config's top-k and top-p, as ``model.generate`` would. ``compile``
    decodes a lone row with the compiled step (:mod:`tunesmith.inference.compiled`); ``quantize="int8"``
    or ``"int4"`` with quantised weights (:mod:`tunesmith.inference.quantized`).
    """

    prompts = [tokenizer(render_prompt(tokenizer, c), add_special_tokens=False)["input_ids"] for c in conversations]
    config = getattr(model, "generation_config", None)
    sampling = {"top_k": getattr(config, "top_k", 0) or 0, "top_p": getattr(config, "top_p", 1.0) or 1.0}
    new_tokens = decode(model, prompts, max_new_tokens, stop_token_ids(tokenizer), temperature, max_rows=batch_size,
                        compile=compile, quantize=quantize, **(sampling if temperature > 0 else {}))
    return [text.strip() for text in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]


def stream_reply(model, tokenizer, conversation: list[dict[str, str]], max_new_tokens: int = 256,
                 temperature: float = 0.0, compile: bool = False, quantize: Optional[str] = None) -> Iterator[str]:
    """Yield the reply to ``conversation`` piece by piece as it is generated.

    Decodes on :class:`tunesmith.inference.decoding.RowBatch` (the lean decode step) where the model fits the
    slot cache, else streams from ``model.generate``; ``quantize="int8"``/``"int4"`` decodes with quantised weights.
    """

    if quantize is not None:
        model = quantized_twin(model, quantize)  # checks it can apply (one sentence where not)
    if supports_slots(model):
        yield from _stream_on_slots(model, tokenizer, conversation, max_new_tokens, temperature, compile)
        return
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


@torch.no_grad()
def _stream_on_slots(model, tokenizer, conversation, max_new_tokens: int, temperature: float,
                     compile: bool) -> Iterator[str]:
    """:func:`stream_reply` on one row of a :class:`~tunesmith.inference.decoding.RowBatch`: new text after every token."""

    prompt = tokenizer(render_prompt(tokenizer, conversation), add_special_tokens=False)["input_ids"]
    config = getattr(model, "generation_config", None)
    sampling = (temperature, getattr(config, "top_p", 1.0) or 1.0, getattr(config, "top_k", 0) or 0) \
        if temperature > 0 else (0.0, 1.0, 0)
    compiled = compiled_step(model, LeanDecoder.fit(model)) if compile else None
    row, batch = Row(list(prompt), *sampling), RowBatch(model, compiled=compiled)
    stops, sent = set(stop_token_ids(tokenizer)), ""
    batch.join([row], room=max_new_tokens + 1)
    while True:
        ended = row.tokens[-1] in stops or len(row.tokens) >= max_new_tokens
        text = tokenizer.decode(row.tokens, skip_special_tokens=True)
        if (ended or not text.endswith("\ufffd")) and len(text) > len(sent):  # not half a multi-byte character
            yield text[len(sent):]
            sent = text
        if ended:
            return
        batch.step()
