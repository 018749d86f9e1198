"""Turning examples into token ids and labels, with loss only where the recipe wants it.

A conversation is rendered with the chat template one turn at a time: the text the template adds
for an assistant reply (its content and end marker) is trained, everything else (system, user
turns, role headers) is masked with ``IGNORE_INDEX``. Segments are tokenised separately so the
prompt tokens at inference equal the prompt tokens seen in training.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, field, replace
from typing import Literal

from tunesmith.core.errors import TunesmithError
from tunesmith.data.formats import Example
from tunesmith.data.tools import for_template

IGNORE_INDEX = -100
REASONING = re.compile(r"<think>.*?</think>\s*", re.DOTALL)  # a reasoning trace and the space after it
Reasoning = Literal["keep", "strip", "mask"]


@dataclass(frozen=True)
class EncodedExample:
    """Token ids and labels of one example (labels equal the ids where trained, else -100)."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    truncated: bool = False
    source: str = field(default="", compare=False)  # "file, line N": named when a batch's loss is not finite

    @property
    def num_target_tokens(self) -> int:
        """Tokens that contribute to the loss (after the one-token shift of causal LM)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The prompt text for generating the next assistant reply, exactly as in training."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def conversation_segments(tokenizer, messages: tuple[dict[str, str], ...],
                          tools: tuple[dict, ...] = ()) -> list[tuple[str, bool]]:
    """Split a rendered conversation into ``(text, trained)`` segments.

    Tool definitions, calls and results are rendered as :func:`tunesmith.data.tools.for_template` says.
    With a thinking model's template (Qwen3: :func:`empty_thinking`), a reply without a
    ``<think>`` trace is rendered after the template's empty reasoning block, which goes in the
    prompt: the model learns the reply, never to emit an empty trace, so it keeps thinking when
    asked without ``enable_thinking=False``. Such a template renders earlier replies without
    their traces once a later question follows, so there only the last reply is trained and the
    earlier turns are its context, as the template shows them.

    Raises:
        TunesmithError: If the chat template is not prefix-stable (rendering more turns changes
            the text of earlier ones), which makes per-turn masking impossible.
    """
    messages, render = for_template(tokenizer, list(messages), tools)
    empty = empty_thinking(tokenizer, render)
    replies = [index for index, message in enumerate(messages) if message["role"] == "assistant"]
    segments: list[tuple[str, bool]] = []
    done = ""
    for index in replies[-1:] if empty else replies:
        plain = empty and "<think>" not in (messages[index].get("content") or "")
        prompt_render = {**render, "enable_thinking": False} if plain else render
        prompt = tokenizer.apply_chat_template(messages[:index], tokenize=False, add_generation_prompt=True,
                                               **prompt_render) if index else ""
        full = tokenizer.apply_chat_template(messages[: index + 1], tokenize=False, **render)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise TunesmithError(
                "the chat template renders earlier turns differently as the conversation grows, so "
                "assistant turns cannot be masked; choose another data.template (e.g. chatml)"
            )
        segments += [(prompt[len(done):], False), (full[len(prompt):], True)]
        done = full
    rest = tokenizer.apply_chat_template(messages, tokenize=False, **render)[len(done):]
    if rest:
        segments.append((rest, False))
    return [(text, trained) for text, trained in segments if text]


def empty_thinking(tokenizer, render: dict) -> str:
    """The empty reasoning block a thinking model's template puts before a reply without one, or ``""``.

    Qwen3's template adds ``<think>\n\n</think>\n\n`` to the generation prompt when asked with
    ``enable_thinking=False`` (and before the last reply of a conversation); a template that ignores
    the switch renders the same prompt either way.
    """
    known = _empty_thinking.get(tokenizer) if not render else None
    if known is not None and known[0] == tokenizer.chat_template:
        return known[1]
    probe = [{"role": "user", "content": "\u2063"}]
    thinking = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True, **render)
    not_thinking = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True,
                                                 **{**render, "enable_thinking": False})
    empty = ""
    if not_thinking != thinking and not_thinking.startswith(thinking) and "</think>" in not_thinking:
        empty = not_thinking[len(thinking):]
    if not render:
        try:
            _empty_thinking[tokenizer] = (tokenizer.chat_template, empty)
        except TypeError:  # not weak-referenceable: rendered again next time
            pass
    return empty


_empty_thinking: "weakref.WeakKeyDictionary[object, tuple[str, str]]" = weakref.WeakKeyDictionary()


def strip_reasoning(messages: tuple[dict[str, str], ...]) -> tuple[dict[str, str], ...]:
    """The conversation with every ``<think>...</think>`` trace removed from the assistant turns."""
    return tuple({**m, "content": REASONING.sub("", m["content"])} if m["role"] == "assistant" else m
                 for m in messages)


def mask_reasoning(segments: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Split trained segments so that their ``<think>...</think>`` traces are context, not targets."""
    split: list[tuple[str, bool]] = []
    for text, trained in segments:
        start = 0
        for match in REASONING.finditer(text) if trained else ():
            split += [(text[start : match.start()], True), (match.group(), False)]
            start = match.end()
        split.append((text[start:], trained))
    return [(text, trained) for text, trained in split if text]


def encode_example(
    example: Example,
    tokenizer,
    max_length: int,
    train_on: Literal["assistant", "all"] = "assistant",
    reasoning: Reasoning = "keep",
) -> EncodedExample | None:
    """Tokenise one example and build its labels.

    Args:
        reasoning: What happens to ``<think>...</think>`` traces in assistant turns (``data.reasoning``):
            kept and trained, stripped from the text, or kept as context but masked out of the loss.

    Returns:
        The encoded example, truncated to ``max_length``, or None if nothing is left to train on
        after truncation (the prompt alone is longer than ``max_length``).
    """
    example = bound_characters(example, character_budget(tokenizer, max_length))
    if example.text is not None:
        ids = _encode(tokenizer, example.text)
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        labels = list(ids)
    else:
        if not any(message["role"] == "assistant" for message in example.messages):
            raise TunesmithError(f"{example.where}: the conversation has no assistant turn to learn from")
        ids, labels = [], []
        messages = strip_reasoning(example.messages) if reasoning == "strip" else example.messages
        segments = conversation_segments(tokenizer, messages, example.tools)
        for text, trained in mask_reasoning(segments) if reasoning == "mask" else segments:
            segment = _encode(tokenizer, text)
            ids += segment
            labels += segment if (trained or train_on == "all") else [IGNORE_INDEX] * len(segment)
    truncated = len(ids) > max_length
    encoded = EncodedExample(tuple(ids[:max_length]), tuple(labels[:max_length]), truncated, example.where)
    return encoded if encoded.num_target_tokens > 0 else None


# Characters kept beyond max_length x the longest token: the tokens near a cut may merge differently.
CHARACTER_MARGIN = 1024
_longest_token: "weakref.WeakKeyDictionary[object, int]" = weakref.WeakKeyDictionary()


def longest_token_chars(tokenizer) -> int:
    """Characters of the vocabulary's longest token (its stored form, never shorter than the text it covers)."""
    try:
        return _longest_token[tokenizer]
    except (KeyError, TypeError):
        pass
    vocabulary = tokenizer.get_vocab()
    added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    longest = max((len(token) for token in (*vocabulary, *added)), default=1)
    try:
        _longest_token[tokenizer] = longest
    except TypeError:  # not weak-referenceable: computed again next time
        pass
    return longest


def character_budget(tokenizer, max_length: int) -> int:
    """Characters that always hold more than ``max_length`` tokens: what is beyond them is cut unread."""
    return max_length * longest_token_chars(tokenizer) + CHARACTER_MARGIN


def bound_characters(example: Example, budget: int) -> Example:
    """The example with its text, or its turns together, cut to ``budget`` characters.

    A token covers at most ``longest_token_chars`` characters, so the first ``max_length`` tokens of
    the cut text are those of the whole text, and tokenising a 50 MB line costs what its first
    ``budget`` characters cost (the tokenizer's working memory grows with its input: one such line
    once took training to 10 GB). Turns after the budget keep their role with empty content, so the
    conversation's shape (and its assistant turn) is unchanged.
    """
    if example.text is not None:
        return example if len(example.text) <= budget else replace(example, text=example.text[:budget])
    if sum(len(message["content"]) for message in example.messages) <= budget:
        return example
    messages, left = [], budget
    for message in example.messages:
        content = message["content"][:left]
        left -= len(content)
        messages.append({**message, "content": content})
    return replace(example, messages=tuple(messages))


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
