"""One decoding path for every caller: rows that join and leave a running batch at any step.

``tunesmith generate``, evaluation's generation tasks, GRPO's rollouts and the server's continuous
batcher all decode through :class:`RowBatch`. Its KV cache (:class:`SlotCache`) gives each row a
slot of its own: the row's keys and values start at position 0 of its slot and nothing is padded
on the left, so a row can join (its prompt is prefilled alone into a free slot) or leave (the last
active slot moves into its place) between two steps without touching the other rows' caches.
A decode step runs every active row's one new token through the model as one batch; attention
reads each slot up to its own length (a boolean mask hides the rest of the slot).

Why not transformers' continuous-batching manager (``init_continuous_batching``)? It flattens all
rows into one sequence of batch size 1 with paged attention, so peft's per-row adapter selection
(``adapter_names``, one name per batch row) cannot tell the rows apart, and serving several adapters
of one base in one batch is the point here. This module keeps a real batch dimension instead: rows of
different adapters run as one batch, each row with its own adapter's update (:mod:`tunesmith.methods.lora_rows`:
two products per layer for all rows, in the lean decode step too; peft's mixed-batch forward, with
``adapter_names``, for the adapter kinds it does not handle).

Sampling draws from each row's own ``torch.Generator``, so a seeded row samples the same tokens
whatever else shares its batch. Greedy rows take the argmax and draw nothing.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Optional

import torch

from tunesmith.inference.compiled import CompiledStep, compiled_step
from tunesmith.inference.invariant import CHUNK_ROWS, decode_attention, padded_keys, pads_lone_rows, row_invariant
from tunesmith.inference.quantized import quantized_twin
from tunesmith.methods.lora_rows import BASE_ROW, RowLora


class SlotCache:
    """Per-layer key/value buffers ``(slots, kv_heads, capacity, head_dim)``; a row owns one slot.

    The model calls :meth:`update` once per layer with the new keys and values; what it returns is
    what that layer attends to. The caller sets the step's plan first (:meth:`plan_prefill` or
    :meth:`plan_decode`) and advances the lengths after the forward pass.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device, slots: int = 4,
                 capacity: int = 128) -> None:
        shape = (slots, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.lengths: list[int] = [0] * slots  # tokens held per slot
        self._plan: tuple = ("decode", 0)

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def reserve(self, slots: int, capacity: int) -> None:
        """Grow the buffers (doubling) so that ``slots`` slots of ``capacity`` positions fit."""
        new_slots = self.slots
        while new_slots < slots:
            new_slots *= 2
        new_capacity = self.capacity
        while new_capacity < capacity:
            new_capacity *= 2
        if (new_slots, new_capacity) == (self.slots, self.capacity):
            return
        for buffers in (self.keys, self.values):
            for layer, old in enumerate(buffers):
                grown = old.new_zeros((new_slots, old.shape[1], new_capacity, old.shape[3]))
                grown[: old.shape[0], :, : old.shape[2]] = old
                buffers[layer] = grown
        self.lengths += [0] * (new_slots - len(self.lengths))

    def plan_prefill(self, slots: list[int], pads: list[int], prefixes: Optional[list["Prefix"]] = None) -> None:
        """The next forward is left-padded prompts (``pads[i]`` pad tokens first) for these consecutive slots; with
        ``prefixes`` (one per row, all of the same tokens; per adapter, LoRA changes keys and values), the prompts'
        parts after it (row i's prefix keys/values go first into its slot)."""
        self._plan = ("prefill", slots, pads, prefixes)

    def plan_capture(self, prefixes: list["Prefix"]) -> None:
        """The next forward is one sequence per prefix whose keys/values are kept in it (no slot is written)."""
        self._plan = ("capture", prefixes)

    def plan_decode(self, rows: int, device, keys: Optional[int] = None) -> None:
        """The next forward is one new token for each of slots ``0 .. rows - 1``; attention reads ``keys`` positions
        of each slot (default: up to the longest row's new token)."""
        positions = torch.tensor(self.lengths[:rows], device=device)  # where each row's new token goes
        heads, capacity = self.keys[0].shape[1], self.capacity
        # the flat position of (row, head, new token) in a buffer viewed as (slots * heads * capacity, head_dim):
        # one index_copy_ per layer writes them all (advanced-index assignment took ~1 ms a layer at 32 rows)
        flat = (torch.arange(rows, device=device)[:, None] * heads + torch.arange(heads, device=device)[None]) \
            * capacity + positions[:, None]  # (rows, heads)
        self._plan = ("decode", rows, flat.reshape(-1), keys or max(self.lengths[:rows]) + 1)

    def move(self, source: int, target: int) -> None:
        """Copy slot ``source`` into slot ``target`` (a row leaving makes room this way)."""
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, : self.lengths[source]] = buffer[source, :, : self.lengths[source]]
        self.lengths[target] = self.lengths[source]

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, **kwargs):
        """Store this step's keys/values (batch, kv_heads, new, head_dim); return what attention reads."""
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._plan[0] == "capture":
            for row, prefix in enumerate(self._plan[1]):
                prefix.keys.append(key[row : row + 1])
                prefix.values.append(value[row : row + 1])
            return key, value
        if self._plan[0] == "prefill":
            _, slots, pads, prefixes = self._plan
            shared = 0 if prefixes is None else len(prefixes[0].tokens)
            for row, (slot, pad) in enumerate(zip(slots, pads)):
                keys[slot, :, shared : shared + key.shape[2] - pad] = key[row, :, pad:]
                values[slot, :, shared : shared + key.shape[2] - pad] = value[row, :, pad:]
            if prefixes is None:
                return key, value  # the prompt attends to itself (left-padded, masked by the caller)
            rows = key.shape[0]
            if all(prefix is prefixes[0] for prefix in prefixes):  # (1, kv_heads, shared, head_dim), read by every row
                shared_keys = prefixes[0].keys[layer_idx].expand(rows, -1, -1, -1)
                shared_values = prefixes[0].values[layer_idx].expand(rows, -1, -1, -1)
            else:  # rows of different adapters: each its adapter's  (rows, kv_heads, shared, head_dim)
                shared_keys = torch.cat([prefix.keys[layer_idx] for prefix in prefixes])
                shared_values = torch.cat([prefix.values[layer_idx] for prefix in prefixes])
            keys[slots[0] : slots[-1] + 1, :, :shared] = shared_keys  # the joining slots are consecutive
            values[slots[0] : slots[-1] + 1, :, :shared] = shared_values
            return torch.cat([shared_keys, key], 2), torch.cat([shared_values, value], 2)
        _, rows, flat, longest = self._plan
        head_dim = keys.shape[-1]
        keys.view(-1, head_dim).index_copy_(0, flat, key[:, :, 0].reshape(-1, head_dim).to(keys.dtype))
        values.view(-1, head_dim).index_copy_(0, flat, value[:, :, 0].reshape(-1, head_dim).to(values.dtype))
        return keys[:rows, :, :longest], values[:rows, :, :longest]


@dataclass
class Prefix:
    """Prompt tokens that rows joining together share (a chat template's system prompt) and their keys/values."""

    tokens: list[int]
    adapter: Optional[str] = None  # computed with this row adapter (LoRA changes keys and values)
    keys: list[torch.Tensor] = field(default_factory=list)  # per layer (1, kv_heads, len(tokens), head_dim)
    values: list[torch.Tensor] = field(default_factory=list)

    def starts(self, prompt: list[int]) -> bool:
        """Whether ``prompt`` begins with this prefix and goes on after it."""
        return len(prompt) > len(self.tokens) and prompt[: len(self.tokens)] == self.tokens


MIN_PREFIX = 16  # shortest shared prompt start worth computing once (a forward of its own)


def prefill_length(prefixes: dict[Optional[str], Prefix], row: "Row") -> int:
    """Tokens of ``row``'s prompt a join would run through the model, given the shared starts known per adapter."""
    known = prefixes.get(row.adapter)
    return len(row.prompt) - len(known.tokens) if known is not None and known.starts(row.prompt) else len(row.prompt)


def common_prefix(prompts: list[list[int]]) -> int:
    """Length of the longest start all ``prompts`` share, leaving at least one token of each after it."""
    shortest = min(len(prompt) for prompt in prompts) - 1
    first = prompts[0]
    for position in range(max(shortest, 0)):
        token = first[position]
        if any(prompt[position] != token for prompt in prompts):
            return position
    return max(shortest, 0)


@dataclass
class Row:
    """One sequence being decoded: its prompt, its sampling settings and what it has produced."""

    prompt: list[int]
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    generator: Optional[torch.Generator] = None  # sampling draws from it (seeded per request)
    adapter: Optional[str] = None  # peft adapter name for this row; None = the model as it is
    tokens: list[int] = field(default_factory=list)
    slot: int = -1

    def pick(self, logits: torch.Tensor) -> int:
        """The next token from this row's logits (vocabulary,): argmax, or a draw (temperature, top-k, top-p)."""
        if self.temperature <= 0:
            return int(greedy_tokens(logits))
        logits = logits.float() / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            threshold = torch.topk(logits, self.top_k).values[-1]
            logits = logits.masked_fill(logits < threshold, float("-inf"))
        if self.top_p < 1.0:  # as transformers' TopPLogitsWarper: drop the low tail holding 1 - top_p
            ordered, order = torch.sort(logits, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[-1] = False
            logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """The argmax of ``logits`` over its last dimension (the first index on ties, as ``argmax``).

    Through ``max``: its kernel takes 1.4 ms for 32 rows of SmolLM2's 49,152 bfloat16 logits against 5.8 ms for
    ``argmax``'s (44 against 176 µs for one row; two threads, benchmarks/RESULTS.md, session 13), the same index."""
    return logits.max(-1).indices


def _pick_each(rows: list[Row], logits: torch.Tensor) -> None:
    """Append each row's next token; ``logits`` (rows, vocabulary). Greedy rows share one argmax call."""
    greedy = greedy_tokens(logits).tolist()
    for row, token, row_logits in zip(rows, greedy, logits):
        row.tokens.append(token if row.temperature <= 0 else row.pick(row_logits))


class RowBatch:
    """The running batch of one model: rows join (prefill), step together (decode) and leave.

    Args:
        model: A causal LM whose attention layers call ``cache.update`` (transformers' Llama, Qwen2,
            Mistral, ... families), optionally wrapped by peft.
        mixed_adapters: Rows carry their own peft adapter (``Row.adapter``; None: the base): per-row LoRA
            (:class:`tunesmith.methods.lora_rows.RowLora`), or peft's mixed-batch forward where that cannot serve.
        compiled: The compiled single-row step (:mod:`tunesmith.inference.compiled`), taken while one row decodes.
        invariant: Every forward runs batch-invariant (:mod:`tunesmith.inference.invariant`): a row's logits are
            bit for bit the ones it gets alone, whatever else is in the batch (for bfloat16 serving, where
            rounding makes batches visible).
        prefixes: Where the shared prompt starts live (per adapter); an earlier batch of the same model and adapters
            may hand over its own (the server keeps them while it has no batch), else a new dict.
    """

    def __init__(self, model, mixed_adapters: bool = False, compiled: Optional[CompiledStep] = None,
                 invariant: bool = False, prefixes: Optional[dict[Optional[str], "Prefix"]] = None) -> None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        parameter = next(model.parameters())
        self.model, self.mixed_adapters = model, mixed_adapters
        self.device = parameter.device
        dtype = parameter.dtype  # under autocast (GRPO's rollouts) keys and values come in autocast's dtype
        if torch.is_autocast_enabled(self.device.type):
            dtype = torch.get_autocast_dtype(self.device.type)
        self.cache = SlotCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, dtype, parameter.device)
        self.rows: list[Row] = []  # row i lives in slot i
        self.prefixes = {} if prefixes is None else prefixes  # per adapter: the shared prompt start computed last
        self.lean = LeanDecoder.fit(model)  # the decode step without transformers' per-call machinery
        self._row_lora: Optional[RowLora] = None  # per-row LoRA of self.model (made on the first mixed call)
        self.compiled = None if mixed_adapters else compiled
        self.invariant = invariant
        self._lone: tuple = (None, False)  # (model, pads_lone_rows(model))
        if invariant and self.lean is not None:  # all rows in one attention call, keys padded (invariant.py)
            self.lean = LeanDecoder(self.lean.causal_lm, self.lean.rotary, decode_attention)

    def __len__(self) -> int:
        return len(self.rows)

    @torch.no_grad()
    def join(self, rows: list[Row], room: int = 1) -> None:
        """Prefill ``rows`` (one left-padded forward) into free slots and pick each row's first token.

        Prefix caching: a start that the joining rows share (at least ``MIN_PREFIX`` tokens, e.g. a chat
        template's system prompt) is computed once, or taken from an earlier join of this batch, and its
        keys/values are copied into each row's slot; the forward then runs only the rest of each prompt. Rows of
        different adapters join in one forward (each row's LoRA its own); the shared start is per adapter,
        all of them computed in one forward too.

        Args:
            room: Positions to keep free after each prompt (the row's token budget).
        """
        if not rows:
            return
        prefixes = self._prefixes_for(rows)
        shared = len(prefixes[0].tokens) if prefixes is not None else 0
        first = len(self.rows)
        longest = max(len(row.prompt) for row in rows) - shared  # of the parts after the shared start
        self.cache.reserve(first + len(rows), shared + longest + room)
        pads = [shared + longest - len(row.prompt) for row in rows]
        for offset, row in enumerate(rows):
            row.slot = first + offset
            self.cache.lengths[row.slot] = len(row.prompt)
        ids = torch.tensor([[0] * pad + row.prompt[shared:] for pad, row in zip(pads, rows)], device=self.device)
        pad = torch.tensor(pads, device=self.device)[:, None]  # (rows, 1)
        position = torch.arange(longest, device=self.device)[None, :]  # (1, longest)
        positions = (position - pad).clamp(min=0) + shared  # (rows, longest)
        real = position >= pad  # (rows, longest)
        causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
        # a pad query attends to itself only, so that no row of the softmax is empty
        mask = (causal[None] & real[:, None, :]) | torch.eye(longest, dtype=torch.bool, device=self.device)[None]
        if shared:  # every query reads the whole shared start first
            mask = torch.cat([mask.new_ones(len(rows), longest, shared), mask], dim=2)  # (rows, longest, shared + longest)
        self.cache.plan_prefill([row.slot for row in rows], pads, prefixes)
        logits = self._forward(ids, positions, mask[:, None], rows)
        self.rows += rows
        _pick_each(rows, logits[:, -1])

    @torch.no_grad()
    def step(self) -> None:
        """One new token for every row (each row's last token goes in, the next comes out)."""
        count = len(self.rows)
        compiled = self.compiled is not None and count == 1
        row_lora = self._row_lora_for(self.rows)
        lean = self.lean is not None and (row_lora is not None or not self.mixed_adapters)
        # a lone row whose products would take the one-row kernel (pads_lone_rows) steps beside its twin, which
        # writes and reads position 0 of the next (free) slot: two-row products give it its bits in company without
        # the invariant mode, which cost 8 ms of a 44 ms SmolLM2 step (benchmarks/RESULTS.md, session 13)
        stepped = self.rows * 2 if lean and not compiled and self.invariant and count == 1 and self._cut(1) else self.rows
        lengths = self.cache.lengths[: len(stepped)]
        width = padded_keys(max(lengths) + 1) if self.invariant else max(lengths) + 1  # keys attention reads
        self.cache.reserve(len(stepped), width)
        ids = torch.tensor([[row.tokens[-1]] for row in stepped], device=self.device)
        positions = torch.tensor(lengths, device=self.device)[:, None]  # (rows, 1)
        keys = torch.arange(width, device=self.device)[None, :]  # (1, width)
        mask = keys <= positions  # (rows, width): each row reads its own slot up to its new token
        self.cache.plan_decode(len(stepped), self.device, width)
        logits = self.compiled(ids, self.cache) if compiled else None  # None: not run (or its compile failed)
        if logits is None and lean:
            with row_invariant(self.model, prefill=False, enabled=self.invariant and self._cut(len(stepped))), \
                    row_lora.rows([row.adapter for row in stepped]) if row_lora is not None else contextlib.nullcontext():
                logits = self.lean(ids, positions, mask[:, None, None], self.cache)
        elif logits is None:
            logits = self._forward(ids, positions, mask[:, None, None], self.rows)
        for slot in range(count):
            self.cache.lengths[slot] += 1
        _pick_each(self.rows, logits[:count, -1])

    def _prefixes_for(self, rows: list[Row]) -> Optional[list[Prefix]]:
        """Per row, the shared start to reuse (each row's adapter's; all of the same tokens): the last ones if
        every row begins with them; else a start known for another adapter that every row begins with (a lone row
        too: a chat template's system prompt, seen once for any adapter, is then computed once per adapter, not
        again in every join of that adapter's rows); else the rows' longest common start when it is at least
        ``MIN_PREFIX`` tokens. The adapters' missing ones are computed now, in one forward; None: no shared start."""
        adapters = list(dict.fromkeys(row.adapter for row in rows))
        known = [self.prefixes.get(adapter) for adapter in adapters]
        if all(prefix is not None and prefix.tokens == known[0].tokens for prefix in known) and \
                all(known[0].starts(row.prompt) for row in rows):
            return [self.prefixes[row.adapter] for row in rows]
        template = next((prefix for prefix in self.prefixes.values() if all(prefix.starts(row.prompt) for row in rows)),
                        None)
        if template is not None:
            tokens, shared = template.tokens, len(template.tokens)
        elif len(rows) < 2:
            return None
        else:
            shared = common_prefix([row.prompt for row in rows])
            if shared < MIN_PREFIX:
                return None
            tokens = rows[0].prompt[:shared]
        made = [Prefix(tokens, adapter) for adapter, prefix in zip(adapters, known)
                if prefix is None or prefix.tokens != tokens]
        if not made:
            return [self.prefixes[row.adapter] for row in rows]
        ids = torch.tensor([tokens] * len(made), device=self.device)
        positions = torch.arange(shared, device=self.device)[None].expand(len(made), -1)  # (adapters, shared)
        mask = torch.ones(shared, shared, dtype=torch.bool, device=self.device).tril()[None, None]
        self.cache.plan_capture(made)
        self._forward(ids, positions, mask, [Row(tokens, adapter=prefix.adapter) for prefix in made])
        self.prefixes.update((prefix.adapter, prefix) for prefix in made)
        return [self.prefixes[row.adapter] for row in rows]

    def leave(self, row: Row) -> None:
        """Free ``row``'s slot: the last row moves into it, nobody else is touched."""
        last = self.rows.pop()
        if last is not row:
            self.cache.move(last.slot, row.slot)
            last.slot = row.slot
            self.rows[row.slot] = last
        self.cache.lengths[len(self.rows)] = 0
        row.slot = -1

    def _row_lora_for(self, rows: list[Row]) -> Optional[RowLora]:
        """The per-row LoRA that serves ``rows`` of a mixed-adapter batch; None: not mixed, or peft's forward must."""
        if not self.mixed_adapters:
            return None
        if self._row_lora is None or self._row_lora.model is not self.model:  # the server may swap in a new wrapper
            self._row_lora = RowLora(self.model)
        return self._row_lora if self._row_lora.supports([row.adapter for row in rows]) else None

    def _cut(self, count: int) -> bool:
        """Whether a batch-invariant decode step of ``count`` rows needs :func:`row_invariant`: above ``CHUNK_ROWS``
        rows, or one row where :func:`pads_lone_rows` (kept per model: the server may swap in a new wrapper; the lean
        step runs such a row beside its twin instead); the mode costs about 8 ms a SmolLM2 step on two threads, so 2
        to 32 rows run without it."""
        if self._lone[0] is not self.model:
            self._lone = (self.model, pads_lone_rows(self.model))
        return count > CHUNK_ROWS or (count == 1 and self._lone[1])

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, rows: list[Row]):
        """Logits (rows, 1, vocabulary) at the last position, through the model's own forward (batch-invariant
        when ``self.invariant``: every prefill, a decode step :meth:`_cut` names)."""
        prefill = ids.shape[1] > 1 or self.cache._plan[0] != "decode"
        invariant = row_invariant(self.model, prefill,
                                  enabled=self.invariant and (prefill or self._cut(len(rows))))
        extra, per_row = {}, contextlib.nullcontext()
        row_lora = self._row_lora_for(rows)
        if row_lora is not None:
            per_row = row_lora.rows([row.adapter for row in rows])
        elif self.mixed_adapters:  # adapters only peft serves (DoRA, modules_to_save, ...): its mixed-batch forward
            extra["adapter_names"] = [row.adapter or BASE_ROW for row in rows]
        # the last position as an index tensor: the LM head then reads a contiguous copy of the rows' last hidden
        # states. ``logits_to_keep=1`` slices them (a strided view), and a bfloat16 matmul over that view took
        # 8.9 s for 32 rows of SmolLM2 against 0.014 s contiguous (float32: 0.28 s against 0.037 s), one thread
        last = torch.tensor([ids.shape[1] - 1], device=self.device)
        with invariant, per_row:
            output = self.model(input_ids=ids, position_ids=positions, attention_mask=mask, cache=self.cache,
                                use_cache=True, logits_to_keep=last, **extra)
        return output.logits  # (rows, 1, vocabulary)


class LeanDecoder:
    """One decode step through the model's own modules, without the wrappers around them.

    A decode step of a 135M model on two CPU threads spends a large part of its time outside the
    matmuls: in ``forward``'s decorators, mask preparation, output records and the keyword plumbing
    of every layer. This runs the same modules (embedding, rotary, norms, projections, MLP, LM head)
    and the model's own attention function in the same order with the same arguments, so the logits
    are the ones ``model(...)`` gives, bit for bit (tested against ``model.generate``). A LoRA-wrapped
    model runs its LoRA layers (the active adapter, or each row's own under :class:`RowLora`); mixed-adapter
    batches that only peft's mixed-batch forward can serve go through ``model(...)``.
    """

    def __init__(self, causal_lm, rotary, attend) -> None:
        self.causal_lm, self.body, self.rotary, self.attend = causal_lm, causal_lm.model, rotary, attend
        self.layers = list(self.body.layers[: causal_lm.config.num_hidden_layers])

    @classmethod
    def fit(cls, model) -> Optional["LeanDecoder"]:
        """The lean step for ``model`` (bare or peft-wrapped) when its layers have the Llama layout; else None."""
        import sys

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        body = getattr(causal_lm, "model", None)
        layers = getattr(body, "layers", None)
        if not layers or not all(hasattr(body, name) for name in ("embed_tokens", "rotary_emb", "norm")):
            return None
        attention = getattr(layers[0], "self_attn", None)
        family = sys.modules[type(attention).__module__]  # the modeling file: its rotary and eager attention
        rotary, eager = getattr(family, "apply_rotary_pos_emb", None), getattr(family, "eager_attention_forward", None)
        parts = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
        implementation = causal_lm.config._attn_implementation
        if rotary is None or eager is None or implementation not in ("sdpa", "eager") or \
                not all(hasattr(attention, name) for name in parts):
            return None
        return cls(causal_lm, rotary, ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager))

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor, cache: SlotCache):
        """Logits (rows, 1, vocabulary) of one new token per row: ``ids`` and ``positions`` (rows, 1)."""
        hidden = self.body.embed_tokens(ids)  # (rows, 1, hidden)
        rotation = self.body.rotary_emb(hidden, position_ids=positions)
        for layer in self.layers:
            hidden = hidden + self._attention(layer.self_attn, layer.input_layernorm(hidden), rotation, mask, cache)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.causal_lm.lm_head(self.body.norm(hidden))

    def _attention(self, attention, hidden: torch.Tensor, rotation, mask: torch.Tensor, cache: SlotCache):
        shape = (*hidden.shape[:-1], -1, attention.head_dim)  # (rows, 1, heads, head_dim)
        query, key = attention.q_proj(hidden).view(shape), attention.k_proj(hidden).view(shape)
        if hasattr(attention, "q_norm"):  # Qwen3 normalises each head
            query, key = attention.q_norm(query), attention.k_norm(key)
        value = attention.v_proj(hidden).view(shape).transpose(1, 2)
        query, key = self.rotary(query.transpose(1, 2), key.transpose(1, 2), *rotation)
        key, value = cache.update(key, value, attention.layer_idx)
        output, _ = self.attend(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)
        return attention.o_proj(output.reshape(*hidden.shape[:-1], -1).contiguous())


SLOT_FAMILIES = ("llama", "qwen2", "qwen3", "mistral")  # attention calls cache.update, rotary from position_ids


def supports_slots(model) -> bool:
    """Whether ``model`` can decode on the slot cache: a transformers causal LM of a family known to
    work, without sliding-window attention, bare or with LoRA adapters only (prompt and prefix
    tuning change the sequence the model sees; they decode through ``model.generate``)."""
    from transformers import PreTrainedModel

    # A model wrapped by peft means peft is imported: asking sys.modules spares a bare model's command the import
    # of peft (1-6 s here, bitsandbytes with it; benchmarks/RESULTS.md, session 12).
    peft = sys.modules.get("peft")
    inner = model
    if peft is not None and isinstance(model, peft.PeftModel):
        if any(getattr(config.peft_type, "value", "") != "LORA" for config in model.peft_config.values()):
            return False
        inner = model.get_base_model()
    if not isinstance(inner, PreTrainedModel):
        return False
    config = inner.config
    return (config.model_type in SLOT_FAMILIES and not getattr(config, "use_sliding_window", False)
            and (config.model_type != "mistral" or getattr(config, "sliding_window", None) is None))


def decode(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int] | list[int] = (),
           temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
           generator: Optional[torch.Generator] = None, max_rows: int = 64, compile: bool = False,
           quantize: Optional[str] = None) -> list[list[int]]:
    """New tokens for each prompt, greedy (temperature 0) or sampled; a row ends at a stop id or the limit.

    Rows leave the batch as they finish and waiting prompts take their slots (at most ``max_rows``
    decode together). The stop token that ended a row is kept as its last token, as ``generate`` does.

    Args:
        generator: Where sampling draws from (all rows share it); None draws from torch's global RNG.
        compile: Decode a lone row (one prompt, or the last one left) with the compiled step
            (:mod:`tunesmith.inference.compiled`): faster per token, minutes to compile the first time.
        quantize: ``"int8"`` or ``"int4"`` decodes with quantised copies of the linear layers' weights
            (:mod:`tunesmith.inference.quantized`; ``model`` itself is left as it is), None as loaded.
    """
    stop_ids = set(stop_ids)
    if quantize is not None:
        model = quantized_twin(model, quantize)  # checks it can apply (one sentence where not)
    if not supports_slots(model):
        return _decode_with_generate(model, prompts, max_new_tokens, stop_ids, temperature, top_p, top_k, max_rows)
    rows = [Row(list(prompt), temperature, top_p, top_k, generator) for prompt in prompts]
    compiled = compiled_step(model, LeanDecoder.fit(model)) if compile else None
    waiting, batch = list(rows), RowBatch(model, compiled=compiled)
    room = max_new_tokens + 1
    while waiting or len(batch):
        if waiting and len(batch) < max_rows:
            joining, waiting = waiting[: max_rows - len(batch)], waiting[max_rows - len(batch):]
            batch.join(joining, room)
        else:
            batch.step()
        for row in list(batch.rows):
            if row.tokens[-1] in stop_ids or len(row.tokens) >= max_new_tokens:
                batch.leave(row)
    return [row.tokens for row in rows]


def decode_padded(model, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, max_new_tokens: int,
                  stop_ids: list[int], pad_id: int, **sampling) -> torch.Tensor:
    """:func:`decode` for left-padded prompts, answered as ``generate`` does: (N, T) new tokens, pad after a stop."""
    prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids, prompt_mask)]
    new = decode(model, prompts, max_new_tokens, stop_ids, **sampling)
    width = max(len(tokens) for tokens in new)
    return torch.tensor([tokens + [pad_id] * (width - len(tokens)) for tokens in new], device=prompt_ids.device)


@torch.no_grad()
def _decode_with_generate(model, prompts, max_new_tokens, stop_ids, temperature, top_p, top_k, batch_size):
    """The fallback for models the slot cache does not fit: left-padded batches through ``model.generate``."""
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": top_k} if temperature > 0 else {
        "do_sample": False}
    replies: list[list[int]] = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        width = max(len(prompt) for prompt in batch)
        ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        output = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                eos_token_id=sorted(stop_ids) or None, pad_token_id=0, **sampling)
        for row in output[:, width:].tolist():
            end = next((i + 1 for i, token in enumerate(row) if token in stop_ids), len(row))
            replies.append(row[:end])
    return replies
