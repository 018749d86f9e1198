"""Log-likelihood of continuations given contexts: the primitive under multiple choice and bias probes.

Tokenisation is explicit and recorded. The default, ``joint``, is lm-evaluation-harness 0.4's
(``HFLM._encode_pair``): trailing spaces of the context move to the continuation, context +
continuation are encoded whole with the tokenizer's own special tokens (BOS where the tokenizer
adds it), and the continuation is what follows the context's own encoding. ``separate`` encodes the
two without special tokens and concatenates them after BOS, the way training encodes the segments
of a conversation. An empty context becomes the BOS token (EOS without one). Over-long requests
keep their last ``max_length + 1`` tokens, as lm-eval does.

Speed without changing a number: requests whose model input is the same token row (one-token
continuations of one context, e.g. " A".." D") are scored from one row; the rows of a group
(e.g. the questions of one MMLU subject, which share the description and few-shot block) compute
their common token prefix once and reuse its key/value cache; rows are batched longest first and
only the logits that are scored are computed.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Hashable, Literal, Optional, Sequence

import torch

TokenisationMethod = Literal["joint", "separate"]
TOKENISATION_METHODS: tuple[str, ...] = ("joint", "separate")
TOKENISATIONS = {
    "joint": ("lm-evaluation-harness 0.4 (HFLM): context + continuation encoded whole with the tokenizer's "
              "special tokens, the continuation is what follows the context's encoding; trailing context "
              "spaces move to the continuation; an empty context becomes BOS; the last max_length + 1 tokens kept"),
    "separate": ("context and continuation tokenised separately without special tokens, then concatenated "
                 "after BOS; an empty context becomes BOS; the last max_length + 1 tokens kept"),
}
TOKENISATION = TOKENISATIONS["joint"]
MIN_SHARED_PREFIX = 8  # tokens: below this, a cached prefix saves less than it costs to copy


@dataclass(frozen=True)
class ContinuationScore:
    """How likely a continuation is after its context.

    Attributes:
        logprob: Sum of the natural-log probabilities of the continuation's tokens.
        num_tokens: Tokens in the continuation.
        num_chars: Characters in the continuation text.
        greedy: Whether every continuation token is the model's arg-max prediction.
    """

    logprob: float
    num_tokens: int
    num_chars: int
    greedy: bool


@dataclass(frozen=True)
class TokenRequest:
    """One tokenised request: score ``continuation`` after ``context``.

    Attributes:
        context: Token ids of the context (never empty).
        continuation: Token ids scored (never empty).
        num_chars: Characters of the continuation text (for per-character normalisation).
        group: Requests of one group share a long token prefix (e.g. one subject's few-shot
            block); its key/value cache is computed once. None: no sharing.
    """

    context: list[int]
    continuation: list[int]
    num_chars: int
    group: Optional[Hashable] = None


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def prefix_token_id(tokenizer) -> int:
    """What an empty context becomes: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_with_specials(tokenizer, text: str, add_bos: Optional[bool]) -> list[int]:
    """``text`` encoded as lm-eval's ``HFLM.tok_encode``: the tokenizer's own special tokens (None),
    or forced on/off; never a second BOS when the text already starts with it."""
    kwargs = {} if add_bos is None else {"add_special_tokens": add_bos}
    bos_text = tokenizer.decode([prefix_token_id(tokenizer)])
    if add_bos is None and bos_text and text.startswith(bos_text):
        kwargs = {"add_special_tokens": False}
    return list(tokenizer(text, **kwargs)["input_ids"])


def context_ids(tokenizer, context: str, add_bos: bool) -> list[int]:
    """Token ids of a context without special tokens, with BOS in front when asked (and there is one)."""
    ids = encode_text(tokenizer, context)
    if add_bos and tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def encode_pair(tokenizer, context: str, continuation: str, method: TokenisationMethod = "joint",
                add_bos: Optional[bool] = None,
                encode: Optional[Callable[[str], list[int]]] = None) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` of one request.

    Args:
        method: ``joint`` (lm-eval's) or ``separate`` (see the module docstring).
        add_bos: ``joint``: None keeps the tokenizer's own special tokens (lm-eval's default),
            True/False force them; ``separate``: whether BOS goes before the context.
        encode: ``joint``: the encoder of a context (a memo of :func:`encode_with_specials`, as
            every choice of a question has the same context).

    Raises:
        ValueError: If the continuation tokenises to nothing.
    """
    if not context:  # lm-eval: the prefix token is the context, unless the continuation starts with it
        target = encode_text(tokenizer, continuation)
        prefix = prefix_token_id(tokenizer)
        ids = (target[:1], target[1:]) if target and target[0] == prefix else ([prefix], target)
    elif method == "joint":
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = encode_with_specials(tokenizer, context + continuation, add_bos)
        prefix = encode(context) if encode else encode_with_specials(tokenizer, context, add_bos)
        ids = (prefix, whole[len(prefix):])
    elif method == "separate":
        prefix = context_ids(tokenizer, context, add_bos is not False) or [prefix_token_id(tokenizer)]
        ids = (prefix, encode_text(tokenizer, continuation))
    else:
        raise ValueError(f"tokenisation must be one of {TOKENISATION_METHODS}, not {method!r}")
    if not ids[1]:
        raise ValueError(f"continuation {continuation!r} has no tokens of its own after context {context[-40:]!r}")
    return ids


def max_model_length(model, tokenizer=None, default: int = 2048) -> int:
    """The longest sequence the model takes, found as lm-eval's ``resolve_max_length`` finds it."""
    config = getattr(model.config, "text_config", None) or model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if getattr(config, name, None) is not None:
            return int(getattr(config, name))
    tokenizer_length = getattr(tokenizer, "model_max_length", None)
    if tokenizer_length is not None and tokenizer_length < 10**29:  # 1e30 means "unset" in transformers
        return int(tokenizer_length)
    return default


@torch.no_grad()
def score_continuations(model, tokenizer, requests: Sequence[tuple[str, str]], batch_size: int = 16,
                        add_bos: Optional[bool] = None, tokenisation: TokenisationMethod = "joint",
                        groups: Optional[Sequence[Optional[Hashable]]] = None,
                        on_scored: Optional[Callable[[list[int]], None]] = None) -> list[ContinuationScore]:
    """Score each ``(context, continuation)`` pair by the model's log-likelihood.

    Args:
        model: A causal language model (in eval mode).
        tokenizer: Its tokenizer.
        requests: Pairs of context text and continuation text; a continuation must not be empty.
        batch_size: Rows per forward pass.
        add_bos: See :func:`encode_pair` (False when a chat template already renders BOS).
        tokenisation: ``joint`` (lm-eval's, default) or ``separate``.
        groups: Per request, a key of requests that share a long prefix (see :class:`TokenRequest`).
        on_scored: Called with the indices of the requests each forward pass finished.

    Returns:
        One :class:`ContinuationScore` per request, in order.

    Raises:
        ValueError: If a continuation tokenises to nothing.
    """
    encoded = []
    encode_context = functools.lru_cache(maxsize=64)(lambda text: encode_with_specials(tokenizer, text, add_bos))
    for index, (context, continuation) in enumerate(requests):
        prefix, target = encode_pair(tokenizer, context, continuation, tokenisation, add_bos, encode_context)
        encoded.append(TokenRequest(prefix, target, len(continuation), groups[index] if groups else None))
    return score_token_requests(model, encoded, batch_size, max_length=max_model_length(model, tokenizer),
                                on_scored=on_scored)


@dataclass
class _Row:
    """One model input row and the requests read from it."""

    tokens: list[int]
    group: Optional[Hashable]
    requests: list[int]
    first_scored: int  # first position whose logits are read


def build_rows(encoded: Sequence[TokenRequest], max_length: int) -> list[_Row]:
    """Model input rows: ``(context + continuation)[-(max_length + 1):][:-1]`` per request (lm-eval's
    window); requests with the same row share it. Truncated rows join no group."""
    rows: dict[tuple[int, ...], _Row] = {}
    for index, request in enumerate(encoded):
        whole = request.context + request.continuation
        tokens = whole[-(max_length + 1):][:-1]
        first_scored = len(tokens) - len(request.continuation)
        group = request.group if len(whole) <= max_length + 1 else None
        row = rows.setdefault(tuple(tokens), _Row(tokens, group, [], first_scored))
        row.requests.append(index)
        row.first_scored = min(row.first_scored, first_scored)
        row.group = row.group if row.group == group else None
    return list(rows.values())


def shared_prefix_length(rows: Sequence[_Row]) -> int:
    """Tokens every row starts with, short of each row's first scored position."""
    length = min(row.first_scored for row in rows)
    first = rows[0].tokens
    for row in rows[1:]:
        same = 0
        for a, b in zip(row.tokens[:length], first[:length]):
            if a != b:
                break
            same += 1
        length = same
    return length


def supports_fast_path(model) -> bool:
    """Whether ``model`` takes a key/value cache and ``logits_to_keep`` as transformers models do.

    Not so for peft's prompt-learning methods (and tunesmith's wrapper of them), which put their
    own virtual tokens before the input.
    """
    active = getattr(model, "active_peft_config", None)
    if active is not None:
        if getattr(active, "is_prompt_learning", False):
            return False
        model = model.get_base_model()
    return "logits_to_keep" in inspect.signature(model.forward).parameters


@torch.no_grad()
def score_token_requests(model, encoded: Sequence[TokenRequest | tuple], batch_size: int, pad_token_id: int = 0,
                         max_length: Optional[int] = None,
                         on_scored: Optional[Callable[[list[int]], None]] = None) -> list[ContinuationScore]:
    """Score already tokenised requests (:class:`TokenRequest`, or ``(context, continuation, num_chars)``).

    Rows are right padded and given no attention mask, as lm-eval does: in a causal model padding
    after a row's last token cannot reach it.
    """
    encoded = [r if isinstance(r, TokenRequest) else TokenRequest(*r) for r in encoded]
    max_length = max_length or max_model_length(model)
    device = next(model.parameters()).device
    fast = supports_fast_path(model)
    rows = build_rows(encoded, max_length)
    by_group: dict[Hashable, list[_Row]] = {}
    for row in rows:
        by_group.setdefault(row.group if fast else None, []).append(row)
    scores: dict[int, ContinuationScore] = {}
    for group, members in by_group.items():
        prefix_length = shared_prefix_length(members) if group is not None and len(members) > 1 else 0
        shared = members[0].tokens[:prefix_length]
        cache = prefix_cache(model, shared, device) if prefix_length >= MIN_SHARED_PREFIX else None
        prefix_length = prefix_length if cache is not None else 0
        members = sorted(members, key=lambda r: -len(r.tokens))  # longest first: little padding, early OOM
        for batch in length_batches(members, batch_size, prefix_length):
            scores.update(score_rows(model, encoded, batch, prefix_length, cache, pad_token_id, device, fast))
            if on_scored:
                on_scored([i for row in batch for i in row.requests])
    return [scores[i] for i in range(len(encoded))]


def length_batches(rows: Sequence[_Row], batch_size: int, prefix_length: int,
                   min_fill: float = 0.8) -> list[list[_Row]]:
    """Consecutive batches of rows sorted longest first, each at most ``batch_size`` rows, a new one
    started when a row is shorter than ``min_fill`` of the batch's first (padding is computed in vain)."""
    batches: list[list[_Row]] = []
    for row in rows:
        length = len(row.tokens) - prefix_length
        longest = len(batches[-1][0].tokens) - prefix_length if batches else 0
        if not batches or len(batches[-1]) >= batch_size or length < min_fill * longest:
            batches.append([])
        batches[-1].append(row)
    return batches


def cache_argument(model) -> str:
    """What the forward pass calls its key/value cache (``cache`` since transformers 5.2x)."""
    base = model.get_base_model() if getattr(model, "active_peft_config", None) is not None else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def prefix_cache(model, tokens: list[int], device) -> Optional[list[tuple]]:
    """Key/value tensors of ``tokens`` (batch of one), per layer."""
    if not tokens:
        return None
    output = model(input_ids=torch.tensor([tokens], device=device), use_cache=True, logits_to_keep=1)
    cache = getattr(output, "cache", None) or output.past_key_values
    return [tuple(layer) for layer in cache]


def expand_cache(model, cache: list[tuple], batch: int):
    """A fresh ``DynamicCache`` holding ``cache`` once per row (the forward pass appends to it)."""
    from transformers import DynamicCache

    data = [(keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1), *rest)
            for keys, values, *rest in cache]
    data = [entry if entry[-1] is not None else entry[:2] for entry in data]
    return DynamicCache(ddp_cache_data=data, config=model.config)


def score_rows(model, encoded: Sequence[TokenRequest], batch: Sequence[_Row], prefix_length: int, cache,
               pad_token_id: int, device, fast: bool) -> dict[int, ContinuationScore]:
    """Scores of the requests of one batch of rows (after a cached prefix of ``prefix_length`` tokens)."""
    remainders = [row.tokens[prefix_length:] for row in batch]
    width = max(len(r) for r in remainders)
    input_ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    for index, remainder in enumerate(remainders):
        input_ids[index, : len(remainder)] = torch.tensor(remainder)
    # the columns whose logits are read: every row's scored positions (after the prefix)
    columns = sorted({p - prefix_length for row in batch for p in range(row.first_scored, len(row.tokens))})
    kwargs = {}
    if fast:
        kwargs["logits_to_keep"] = torch.tensor(columns, device=device)
        if cache is not None:
            kwargs[cache_argument(model)] = expand_cache(model, cache, len(batch))
    logits = model(input_ids=input_ids.to(device), use_cache=cache is not None, **kwargs).logits
    if not fast:
        logits = logits[:, columns]
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (batch, columns, vocab)
    column_of = {c: i for i, c in enumerate(columns)}
    scores = {}
    for index, row in enumerate(batch):
        for request_index in row.requests:
            target = encoded[request_index].continuation
            end = len(row.tokens) - prefix_length
            positions = torch.tensor([column_of[p] for p in range(end - len(target), end)], device=logprobs.device)
            target_ids = torch.tensor(target, device=logprobs.device)
            # the last target token is not in the row: it is the one the row's last position predicts
            row_logprobs = logprobs[index, positions]  # (target, vocab)
            token_logprobs = row_logprobs.gather(-1, target_ids[:, None]).squeeze(-1)
            greedy = bool((row_logprobs.argmax(-1) == target_ids).all())
            scores[request_index] = ContinuationScore(float(token_logprobs.sum()), len(target),
                                                      encoded[request_index].num_chars, greedy)
    return scores
