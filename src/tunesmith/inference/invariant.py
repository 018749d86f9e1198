"""Batch-invariant low-precision decoding: a row's bits do not depend on what else is in its batch.

A served row must give the same tokens for the same seed whether it runs alone or beside 31 others. In
float32 the few bits in which a batched kernel differs from a lone one rarely move a logit far enough to change
a token. In bfloat16 they do: each product and each attention output is rounded to 8 bits of mantissa, so one
last-place difference in a hidden state moves logits by about 1e-2 and sampled tokens part. Two kernels make a
row's bits depend on its company (measured with SmolLM2-135M's shapes on two threads, oneDNN, torch 2.13):

- a bfloat16 ``F.linear`` / ``addmm`` over more than about 32 rows switches kernel, and for some shapes
  (576→1536, 576→576) a row's result then depends on how many rows the call holds; at 32 rows or fewer each
  row gets the bits it gets alone. Prefill runs rows × prompt tokens through every product.
  Above 32 rows (a prefill: rows × prompt tokens) a row's bits stay the same only for a fixed row count, wherever
  the row sits in the call and whatever the others hold.
- a lone row (one-row product) may take another kernel than the same row in company: on a Zen 4 CPU (AVX-512
  BF16, no AMX) the 1536→576 product of one row differs from that row's in any product of 2–32 rows in about
  one row in eight (machines with AMX give the same bits). :func:`lone_row_differs` probes each shape once.
- scaled-dot-product attention over a padded batch: a row's output depends on how many masked keys follow its
  own (a decode step reads every slot up to the longest row) and on its left padding and block of queries in
  a prefill. Keys padded to a multiple of 64 give the same bits (the kernel's reductions then see whole vectors
  and masked keys add exact zeros: measured for every padding up to 1,536 keys).

What this module does about it, in one place for the products (a ``TorchFunctionMode`` around a forward, so it
reaches the base products, the LM head and per-row LoRA's products alike) and two small pieces of attention:

- decode step (``row_invariant(prefill=False)``, only needed above 32 rows or for one row where
  :func:`pads_lone_rows`): products in chunks
  of at most :data:`CHUNK_ROWS` rows, a one-row chunk padded to two where :func:`lone_row_differs`; attention
  (:func:`decode_attention`, the lean step's) in one call, every row's keys padded to a multiple of
  :data:`KV_BLOCK` (``RowBatch`` reads that many positions of each slot);
- prefill (``row_invariant(prefill=True)``): products in padded blocks of exactly :data:`BLOCK_ROWS` rows (the
  LM head, one row per prompt, in decode chunks); attention (:func:`prompt_attention`) in blocks of
  :data:`Q_BLOCK` queries aligned to absolute positions, so that a query's bits do not depend on its padding
  or on whether its prompt's start came from the prefix cache.

:func:`check_row_invariance` tests at load time that the products and attention hold it for a model's shapes
on this machine. Costs, SmolLM2-135M, 32 rows, busy machine, one process: a decode step 1.02× plain bfloat16's,
a crowd's prefill 2.1× plain bfloat16's (0.93× float32's); benchmarks/RESULTS.md, session 9.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

CHUNK_ROWS = 32  # most rows a decode product runs over (oneDNN's bfloat16 linear is row-exact up to here)
BLOCK_ROWS = 128  # rows of every prefill product: a fixed shape gives each row the same bits wherever it sits
LOW_PRECISION = (torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def lone_row_differs(in_features: int, out_features: int, dtype: torch.dtype) -> bool:
    """Whether, on this machine, a one-row product ``in_features → out_features`` in ``dtype`` (``F.linear`` or
    ``addmm``) can give a row other bits than the same row gets in a product of 2 to :data:`CHUNK_ROWS` rows.
    Probed once per shape with random rows (on Zen 4, 1536→576 in bfloat16 differs for ~1 row in 8)."""
    generator = torch.Generator().manual_seed(0)
    weight = (torch.randn(out_features, in_features, generator=generator) * 0.05).to(dtype)
    bias = torch.randn(out_features, generator=generator).to(dtype)
    x = torch.randn(CHUNK_ROWS, in_features, generator=generator).to(dtype)
    with torch.no_grad():
        return not (torch.equal(torch.cat([F.linear(row[None], weight) for row in x]), F.linear(x, weight)) and
                    torch.equal(torch.cat([torch.addmm(bias, row[None], weight.t()) for row in x]),
                                torch.addmm(bias, x, weight.t())))


def pads_lone_rows(model) -> bool:
    """Whether a one-row product of one of ``model``'s low-precision linear layers can differ from the same row's in
    company (:func:`lone_row_differs`): then a decode step of one row runs as two rows (``RowBatch.step``: the row
    and its twin; a step through the model's own forward runs under :func:`row_invariant`, which pads each product);
    2 to :data:`CHUNK_ROWS` rows need nothing: they share one kernel."""
    shapes = {(module.in_features, module.out_features, module.weight.dtype) for module in model.modules()
              if isinstance(module, torch.nn.Linear) and module.weight.dtype in LOW_PRECISION}
    return any(lone_row_differs(*shape) for shape in shapes)


def _row_chunks(flat: torch.Tensor, block: Optional[int], rows: int,
                pad_lone: bool = False) -> tuple[list[torch.Tensor], int]:
    """``flat`` (M, in) cut for row-exact products: chunks of at most ``rows`` rows (a chunk of one row padded with
    a zero row when ``pad_lone``), or (``block`` given) chunks of exactly ``block`` rows, the last one padded with
    zero rows; and M."""
    count = flat.shape[0]
    if block is None:
        chunks = [flat] if count <= rows else list(flat.split(rows))
        if pad_lone and len(chunks[-1]) == 1:
            chunks[-1] = torch.cat([chunks[-1], chunks[-1].new_zeros(1, flat.shape[1])])
        return chunks, count
    padded = -(-count // block) * block
    if padded > count:
        flat = torch.cat([flat, flat.new_zeros(padded - count, flat.shape[1])])
    return list(flat.split(block)), count


def chunked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   rows: int = CHUNK_ROWS, block: Optional[int] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` over ``x``'s flattened rows cut as :func:`_row_chunks` cuts them (a lone
    row padded where :func:`lone_row_differs` for ``weight``'s shape)."""
    flat = x.reshape(-1, x.shape[-1])
    pad_lone = block is None and lone_row_differs(weight.shape[1], weight.shape[0], weight.dtype)
    if block is None and flat.shape[0] <= rows and not (pad_lone and flat.shape[0] == 1):
        return F.linear(x, weight, bias)
    chunks, count = _row_chunks(flat, block, rows, pad_lone)
    if bias is not None:
        out = torch.cat([F.linear(chunk, weight, bias) for chunk in chunks])[:count]
    else:  # each chunk's product written into its rows of one buffer (the same bits; one copy fewer)
        out = flat.new_empty(sum(len(chunk) for chunk in chunks), weight.shape[0])
        start = 0
        for chunk in chunks:
            torch.mm(chunk, weight.t(), out=out[start : start + len(chunk)])
            start += len(chunk)
        out = out[:count]
    return out.view(*x.shape[:-1], weight.shape[0])


def chunked_addmm(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1,
                  rows: int = CHUNK_ROWS, block: Optional[int] = None) -> torch.Tensor:
    """``torch.addmm`` over ``mat1``'s rows cut as :func:`_row_chunks` cuts them (a lone row padded as in
    :func:`chunked_linear`)."""
    pad_lone = block is None and lone_row_differs(mat2.shape[0], mat2.shape[1], mat2.dtype)
    if block is None and mat1.shape[0] <= rows and not (pad_lone and mat1.shape[0] == 1):
        return torch.addmm(input, mat1, mat2, beta=beta, alpha=alpha)
    chunks, count = _row_chunks(mat1, block, rows, pad_lone)
    full = input.expand(count, mat2.shape[1])
    missing = sum(map(len, chunks)) - count  # padded rows
    full = torch.cat([full, full.new_zeros(missing, full.shape[1])]) if missing else full
    return torch.cat([torch.addmm(part, chunk, mat2, beta=beta, alpha=alpha)
                      for part, chunk in zip(full.split(len(chunks[0])), chunks)])[:count]


def chunked_addmm_(input: torch.Tensor, mat1: torch.Tensor, mat2: torch.Tensor, *, beta=1, alpha=1,
                   rows: int = CHUNK_ROWS, block: Optional[int] = None) -> torch.Tensor:
    """``input.addmm_(mat1, mat2)`` (``input`` 2-D, one row per row of ``mat1``) over ``mat1``'s rows cut as
    :func:`_row_chunks` cuts them: the bits of :func:`chunked_addmm`, without its copies of ``input``."""
    count = mat1.shape[0]
    pad_lone = block is None and lone_row_differs(mat2.shape[0], mat2.shape[1], mat2.dtype)
    if block is None and count <= rows and not (pad_lone and count == 1):
        return input.addmm_(mat1, mat2, beta=beta, alpha=alpha)
    size = block or rows
    for start in range(0, count, size):
        part, chunk = input[start : start + size], mat1[start : start + size]
        least = block or (2 if pad_lone else 1)  # rows the product must hold: a block, or two for a lone row
        if len(chunk) < least:  # padded with zero rows
            padded = torch.cat([part, part.new_zeros(least - len(chunk), part.shape[1])])
            padded.addmm_(torch.cat([chunk, chunk.new_zeros(least - len(chunk), chunk.shape[1])]), mat2,
                          beta=beta, alpha=alpha)
            part.copy_(padded[: len(chunk)])
        else:
            part.addmm_(chunk, mat2, beta=beta, alpha=alpha)
    return input


KV_BLOCK = 64  # keys attention reads, padded to a multiple of this: the kernel's reductions then see whole vectors
Q_BLOCK = 32  # prompt queries attend in blocks of this many, aligned to absolute positions


def padded_keys(count: int) -> int:
    """Keys a row reading ``count`` of them attends over: ``count`` rounded up to a multiple of :data:`KV_BLOCK`."""
    return -(-count // KV_BLOCK) * KV_BLOCK


def decode_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """A decode step's attention (transformers' attention-function signature): one call for all rows, keys padded
    to a multiple of :data:`KV_BLOCK` by the caller and masked; each row's bits are then its lone ones.

    ``query`` (rows, heads, 1, head_dim), ``key``/``value`` (rows, kv_heads, keys, head_dim), ``attention_mask``
    boolean (rows, 1, 1, keys). Written out (two float32 batched products and a softmax, each query head beside the
    others of its key/value head) instead of ``scaled_dot_product_attention``: the CPU flash kernel, one query a
    row, took 1.2 ms a SmolLM2 layer at 32 rows against 0.23 ms for this (0.05 against 0.04 ms at one row; two
    threads, benchmarks/RESULTS.md, session 13), a third of a 32-row decode step. Masked keys get exact zeros, so
    a row's bits do not depend on how many padded keys follow its own (:func:`_attention_holds` checks it)."""
    rows, heads, _, head_dim = query.shape
    kv_heads = key.shape[1]
    scale = head_dim**-0.5 if scaling is None else scaling
    grouped = query.float().view(rows, kv_heads, heads // kv_heads, head_dim)  # (rows, kv_heads, group, head_dim)
    scores = torch.matmul(grouped, key.float().transpose(2, 3)).mul_(scale)  # (rows, kv_heads, group, keys)
    scores.masked_fill_(~attention_mask, float("-inf"))
    out = torch.matmul(scores.softmax(-1), value.float())  # (rows, kv_heads, group, head_dim)
    return out.view(rows, 1, heads, head_dim).to(query.dtype), None


@dataclass(frozen=True)
class _PromptPlan:
    """Where each query and key of a prefill goes in :func:`prompt_attention`'s blocks (the same for every layer)."""

    query_index: torch.Tensor  # (entries, Q_BLOCK): flat query row of each block slot (the zero row: a pad)
    key_index: torch.Tensor  # (entries, width): flat key row of each block's keys (the zero row: padding)
    mask: torch.Tensor  # (entries, 1, Q_BLOCK, width)


def _prompt_plan(attn_mask: torch.Tensor, rows: int, queries: int, keys: int) -> _PromptPlan:
    shared = keys - queries
    reads = attn_mask[:, 0, -1].expand(rows, -1)  # (rows, keys): the real keys of each row (its last query is real)
    keys_of = [row_reads.nonzero().squeeze(1) for row_reads in reads]
    counts = [len(found) for found in keys_of]
    width = padded_keys(max(counts))
    zero_query, zero_key = rows * queries, rows * keys  # index of an appended zero row
    query_index, key_index, positions, owners = [], [], [], []
    for row, (found, count) in enumerate(zip(keys_of, counts)):
        own = count - shared  # this row's real queries: the last ``own``, at absolute positions shared .. count - 1
        for start in range(shared // Q_BLOCK * Q_BLOCK, count, Q_BLOCK):
            block = torch.arange(start, start + Q_BLOCK)
            real = (block >= shared) & (block < count)
            query_index.append(torch.where(real, row * queries + queries - own + block - shared, zero_query))
            positions.append(torch.where(real, block, -1))
            key_index.append(torch.cat([row * keys + found, torch.full((width - count,), zero_key)]))
            owners.append(count)
    positions, key_position = torch.stack(positions), torch.arange(width)
    mask = (key_position[None, None] <= positions[:, :, None]) & \
        (key_position[None, None] < torch.tensor(owners)[:, None, None])
    mask[:, :, 0] = True  # a block's pad queries read key 0 (no empty softmax row); nobody reads their output
    device = attn_mask.device
    return _PromptPlan(torch.stack(query_index).to(device), torch.stack(key_index).to(device), mask[:, None].to(device))


def prompt_attention(query, key, value, attn_mask, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False,
                     plan: Optional[_PromptPlan] = None):
    """A prefill's attention in a form each query's bits do not depend on its batch, padding or prefix.

    ``attn_mask`` (rows or 1, 1, queries, keys) boolean; ``key`` holds a shared start of ``keys - queries``
    positions (0 without prefix caching) and then each row's left-padded prompt. Every row's real queries are
    cut into blocks of :data:`Q_BLOCK` aligned to absolute positions, each block one batch entry attending over
    the row's real keys padded to a multiple of :data:`KV_BLOCK`, causally; the kernel computes each entry and each
    query alike whatever the others hold, so a query gets the same bits alone, in company or after a cached start.
    """
    rows, heads, queries, dim = query.shape
    kv_heads, width = key.shape[1], value.shape[-1]
    plan = plan or _prompt_plan(attn_mask, rows, queries, key.shape[2])
    flat_query = torch.cat([query.transpose(1, 2).reshape(rows * queries, heads, dim), query.new_zeros(1, heads, dim)])
    flat_key = torch.cat([key.transpose(1, 2).reshape(-1, kv_heads, dim), key.new_zeros(1, kv_heads, dim)])
    flat_value = torch.cat([value.transpose(1, 2).reshape(-1, kv_heads, width), value.new_zeros(1, kv_heads, width)])
    entries = F.scaled_dot_product_attention(
        flat_query[plan.query_index].transpose(1, 2), flat_key[plan.key_index].transpose(1, 2),
        flat_value[plan.key_index].transpose(1, 2), attn_mask=plan.mask, scale=scale,
        enable_gqa=kv_heads != heads)  # (entries, heads, Q_BLOCK, width)
    out = query.new_zeros(rows * queries + 1, heads, width)
    out[plan.query_index.reshape(-1)] = entries.transpose(1, 2).reshape(-1, heads, width)
    return out[:-1].view(rows, queries, heads, width).transpose(1, 2)


class _RowInvariant(TorchFunctionMode):
    """Routes low-precision linear products through :func:`chunked_linear` / :func:`chunked_addmm` /
    :func:`chunked_addmm_` and masked attention through :func:`rowwise_attention`; every other call passes
    through untouched."""

    def __init__(self, block: Optional[int], small: frozenset[int]) -> None:
        super().__init__()
        self.block, self.small = block, small
        self.plans: dict[tuple, _PromptPlan] = {}  # per mask of this forward (every layer reads the same one)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            if weight.dtype in LOW_PRECISION:
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                block = None if id(weight) in self.small else self.block
                return chunked_linear(args[0], weight, bias, block=block)
        elif func is torch.addmm or func is torch.Tensor.addmm:
            if args[1].dtype in LOW_PRECISION and args[1].dim() == 2:
                return chunked_addmm(*args[:3], block=self.block, **kwargs)
        elif func is torch.Tensor.addmm_:  # per-row LoRA adds its update into the base product's result
            if args[1].dtype in LOW_PRECISION and args[1].dim() == 2 and args[0].shape[0] == args[1].shape[0]:
                return chunked_addmm_(*args[:3], block=self.block, **kwargs)
        elif func is F.scaled_dot_product_attention:
            mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
            query = args[0]
            if mask is not None and mask.dtype == torch.bool and mask.dim() == 4 and query.dim() == 4 \
                    and query.shape[2] > 1 and query.dtype in LOW_PRECISION:  # a prefill (a decode step is padded)
                names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
                named = {**dict(zip(names, args)), **kwargs}
                shape = (mask.data_ptr(), tuple(mask.shape), mask.stride(), tuple(query.shape), named["key"].shape[2])
                if shape not in self.plans:
                    self.plans[shape] = _prompt_plan(mask, query.shape[0], query.shape[2], named["key"].shape[2])
                return prompt_attention(**named, plan=self.plans[shape])
        return func(*args, **kwargs)


def row_invariant(model, prefill: bool, enabled: bool = True):
    """A context in which ``model``'s low-precision forward is batch-invariant (see the module's text).

    Args:
        prefill: The forward runs prompts (several tokens a row): its products go in padded blocks of
            :data:`BLOCK_ROWS` rows, the LM head's (one row per prompt) in chunks of at most :data:`CHUNK_ROWS`;
            else (a decode step) every product goes in chunks of at most :data:`CHUNK_ROWS` rows.
        enabled: False gives a context that changes nothing.
    """
    if not enabled:
        return contextlib.nullcontext()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    small = frozenset([id(head.weight)] if head is not None else [])
    return _RowInvariant(BLOCK_ROWS if prefill else None, small)


def wants_row_invariance(model) -> bool:
    """Whether ``model`` computes in a precision whose rounding makes batches visible (bfloat16, float16)."""
    return next(model.parameters()).dtype in LOW_PRECISION


def check_row_invariance(model) -> bool:
    """Whether, on this machine, each of ``model``'s linear shapes gives a row the same bits alone and in company:
    in a decode step's products of 1, 2, 16 and 32 rows and anywhere in a :data:`BLOCK_ROWS`-row block (prefill).
    Logs one line when it does not."""
    generator = torch.Generator().manual_seed(0)
    weights = {tuple(module.weight.shape): module.weight.detach() for module in model.modules()
               if isinstance(module, torch.nn.Linear)}
    for (out_features, in_features), weight in weights.items():
        x = torch.randn(BLOCK_ROWS, in_features, generator=generator).to(weight.dtype)
        with torch.no_grad():
            alone = torch.cat([chunked_linear(x[row : row + 1], weight) for row in range(CHUNK_ROWS)])
            decode = all(torch.equal(chunked_linear(x[:size], weight), alone[:size]) for size in (2, 16, CHUNK_ROWS))
            block = chunked_linear(x[:1], weight, block=BLOCK_ROWS)
            prefill = all(torch.equal(chunked_linear(x.roll(shift, 0), weight, block=BLOCK_ROWS)[shift], block[0])
                          for shift in (0, 1, BLOCK_ROWS - 1))
        if not (decode and prefill):
            return _not_invariant(f"its {str(weight.dtype).removeprefix('torch.')} product {in_features}→{out_features} "
                                  f"gives a row other bits in a {'decode' if not decode else 'prefill'} batch")
    if not _attention_holds(model, generator):
        return _not_invariant("its attention gives a row other bits beside longer rows")
    return True


def _attention_holds(model, generator: torch.Generator) -> bool:
    """Whether a decode step's attention gives a row the same bits alone and beside a longer row (padded keys)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(model.parameters()).dtype
    query = torch.randn(2, heads, 1, head_dim, generator=generator).to(dtype)
    key, value = (torch.randn(2, kv_heads, 3 * KV_BLOCK, head_dim, generator=generator).to(dtype) for _ in range(2))
    mask = (torch.arange(3 * KV_BLOCK)[None] < torch.tensor([[KV_BLOCK - 5], [3 * KV_BLOCK - 1]]))[:, None, None]
    together = decode_attention(None, query, key, value, mask)[0][:1]
    width = padded_keys(KV_BLOCK - 5)
    alone = decode_attention(None, query[:1], key[:1, :, :width], value[:1, :, :width], mask[:1, ..., :width])[0]
    return torch.equal(together, alone)


def _not_invariant(why: str) -> bool:
    logger.warning("batch invariance does not hold on this machine (%s): a seed then gives the same reply alone and "
                   "in a crowd only to rounding; serve in float32 for that (docs/speed.md)", why)
    return False
