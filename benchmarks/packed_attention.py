"""Packed variable-length causal attention on CPU: forward + backward of one SmolLM2 layer, per variant.

    python benchmarks/packed_attention.py                      # 8 documents of 120-400 tokens
    python benchmarks/packed_attention.py --lengths 100,500,250 --repeats 7

Every variant gets the same packed (1, heads, tokens, dim) bfloat16 query and (1, kv heads, tokens,
dim) key/value and the same output gradient; the table gives the median time of forward + backward
over interleaved repeats and the ratio against the eager kernel (scaled-dot-product attention's CPU
flash kernel, once per document: ``tunesmith.training.packing``), each variant's largest difference
from it, and each variant's largest gradient error against the same attention in float64 (the flash
backward's own error is the yardstick). ``tunesmith.training.packed_attention`` is the path taken
under ``train.speed.compile``: the flash forward, the backward written out from its log-sum-exp and
compiled (its cold compile is reported). On a shared machine only the ratios of one run mean anything.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, DIM = 9, 3, 64  # SmolLM2-135M


def per_document(attention):
    def run(q, k, v, lengths):
        pieces = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))
        return torch.cat([attention(a, b, c) for a, b, c in pieces], 2)
    return run


def flash(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def math_backend(q, k, v):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        return flash(q, k, v)


def written_out(q, k, v):
    """bfloat16 products, boolean causal mask, softmax: what autograd keeps is the l² probabilities."""
    length = q.shape[2]
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    scores = (q @ k.transpose(-1, -2)) * DIM ** -0.5
    scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


def flash_float32(q, k, v):
    return flash(q.float(), k.float(), v.float()).to(q.dtype)


def padded(q, k, v, lengths):
    """One call over (documents, heads, longest, dim): right padding is invisible to causal queries."""
    longest = max(lengths)

    def pad(x):
        return torch.cat([F.pad(p, (0, 0, 0, longest - p.shape[2])) for p in x.split(lengths, 2)])
    out = flash(pad(q), pad(k), pad(v))
    return torch.cat([out[i:i + 1, :, :length] for i, length in enumerate(lengths)], 2)


def flex_document_mask(lengths):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    total = sum(lengths)
    mask = create_block_mask(lambda b, h, i, j: (document[i] == document[j]) & (i >= j), None, None, total, total,
                             device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, lengths: compiled(q, k, v, block_mask=mask, enable_gqa=True)


def compiled_backward(compiled):
    from tunesmith.training.packed_attention import packed_causal_attention

    return lambda q, k, v, lengths: packed_causal_attention(q, k, v, lengths, compiled=compiled)


def document_forward(query, key, value, scale: float):
    """One document's causal attention and log-sum-exp written out (bf16 products, float32 masked softmax)."""
    kv_heads, length, dim = key.shape
    group = query.shape[0] // kv_heads
    scores = torch.bmm(query.reshape(kv_heads, group * length, dim), key.transpose(1, 2)).float()
    scores = scores.view(kv_heads, group, length, length) * scale
    positions = torch.arange(length, device=query.device)
    scores = torch.where(positions[None, :] <= positions[:, None], scores, float("-inf"))
    maximum = scores.amax(-1, keepdim=True)
    exponentials = torch.exp(scores - maximum)
    total = exponentials.sum(-1, keepdim=True)
    probabilities = (exponentials / total).to(query.dtype).view(kv_heads, group * length, length)
    output = torch.bmm(probabilities, value).view(kv_heads * group, length, dim)
    return output, (maximum + total.log()).view(kv_heads * group, length)


def block_backward(query, key, value, output, grad_output, lse, scale: float):
    """The compiled backward for the last ``rows`` queries of a document against its first ``keys`` keys."""
    kv_heads, keys, dim = key.shape
    heads, rows, _ = query.shape
    group = heads // kv_heads
    grouped_query, grouped_grad = query.reshape(kv_heads, group * rows, dim), grad_output.reshape(kv_heads, group * rows, dim)
    scores = torch.bmm(grouped_query, key.transpose(1, 2)).float().view(kv_heads, group, rows, keys)
    causal = torch.arange(keys)[None, :] <= torch.arange(keys - rows, keys)[:, None]
    probabilities = torch.where(causal, torch.exp(scores * scale - lse.view(kv_heads, group, rows, 1)), 0.0)
    grad_probabilities = torch.bmm(grouped_grad, value.transpose(1, 2)).float().view(kv_heads, group, rows, keys)
    correction = (grad_output.float() * output.float()).sum(-1).view(kv_heads, group, rows, 1)
    grad_scores = (probabilities * (grad_probabilities - correction) * scale).to(query.dtype).view(kv_heads, group * rows, keys)
    grad_value = torch.bmm(probabilities.to(query.dtype).view(kv_heads, group * rows, keys).transpose(1, 2), grouped_grad)
    return (torch.bmm(grad_scores, key).view(heads, rows, dim), torch.bmm(grad_scores.transpose(1, 2), grouped_query),
            grad_value)


class WrittenOutAttention(torch.autograd.Function):
    """Per document: ``forward(q, k, v, scale) -> (output, lse)`` and ``backward(q, k, v, o, dO, lse, scale)``."""

    @staticmethod
    def forward(ctx, query, key, value, lengths, forward, backward):
        scale = DIM ** -0.5
        pieces = [forward(q[0], k[0], v[0], scale) for q, k, v in zip(*(x.split(lengths, 2) for x in (query, key, value)))]
        output, lse = torch.cat([o for o, _ in pieces], 1)[None], torch.cat([l for _, l in pieces], 1)
        ctx.save_for_backward(query, key, value, output, lse)
        ctx.lengths, ctx.scale, ctx.backward = lengths, scale, backward
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        pieces = zip(*(t.split(ctx.lengths, 1) for t in (query[0], key[0], value[0], output[0], grad_output[0], lse)))
        grads = [ctx.backward(*piece, ctx.scale) for piece in pieces]
        return (*(torch.cat(column, 1)[None] for column in zip(*grads)), None, None, None)


def flash_forward(query, key, value, scale):
    output, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query[None], key[None], value[None],
                                                                              is_causal=True, scale=scale)[:2]
    return output[0], lse[0]


def blocked(block: int, compiled_block):
    """The backward over query blocks of ``block`` rows, each against the keys up to its end (no upper blocks)."""
    def backward(query, key, value, output, grad_output, lse, scale):
        length = key.shape[1]
        grad_key, grad_value = torch.zeros(key.shape), torch.zeros(value.shape)  # float32 sums of the blocks'
        grad_query = []
        for start in range(0, length, block):
            end = min(start + block, length)
            rows = slice(start, end)
            gq, gk, gv = compiled_block(query[:, rows], key[:, :end], value[:, :end], output[:, rows],
                                        grad_output[:, rows], lse[:, rows], scale)
            grad_query.append(gq)
            grad_key[:, :end] += gk
            grad_value[:, :end] += gv
        return torch.cat(grad_query, 1), grad_key.to(key.dtype), grad_value.to(value.dtype)
    return backward


def written_out_variant(forward, backward):
    return lambda q, k, v, lengths: WrittenOutAttention.apply(q, k, v, tuple(lengths), forward, backward)


def forward_backward(variant, inputs, grad, lengths):
    q, k, v = (x.clone().requires_grad_() for x in inputs)
    out = variant(q, k, v, lengths)
    out.backward(grad)
    return [out.detach(), q.grad, k.grad, v.grad]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="120,180,215,260,310,400,150,300", help="document lengths, packed")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by process CPU time (the work, on a busy machine) instead of wall time")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.manual_seed(0)
    total = sum(lengths)
    inputs = [torch.randn(1, heads, total, DIM, dtype=torch.bfloat16) for heads in (HEADS, KV_HEADS, KV_HEADS)]
    grad = torch.randn(1, HEADS, total, DIM, dtype=torch.bfloat16)
    variants = {"per-document flash (today)": per_document(flash),
                "flash forward, compiled backward from log-sum-exp (tunesmith, compile on)": compiled_backward(True),
                "flash forward, the same backward eager": compiled_backward(False),
                "one padded flash call": padded,
                "per-document math backend": per_document(math_backend),
                "per-document written out (bf16)": per_document(written_out),
                "per-document flash in float32": per_document(flash_float32)}
    from tunesmith.training.packed_attention import compiled_document_backward

    compiled_block = torch.compile(block_backward, dynamic=True)
    variants["compiled forward (bmm, softmax, log-sum-exp), compiled backward"] = written_out_variant(
        torch.compile(document_forward, dynamic=True), compiled_document_backward())
    for block in (64, 128):
        variants[f"flash forward, compiled backward over query blocks of {block}"] = written_out_variant(
            flash_forward, blocked(block, compiled_block))
    try:
        variants["flex_attention, document mask, compiled"] = flex_document_mask(lengths)
    except Exception as error:  # noqa: BLE001  (reported, not hidden)
        print(f"flex_attention unavailable: {error}")
    reference = forward_backward(variants["per-document flash (today)"], inputs, grad, lengths)
    exact = forward_backward(per_document(flash), [x.double() for x in inputs], grad.double(), lengths)
    differences, errors, first_call = {}, {}, {}
    for name, variant in list(variants.items()):
        try:
            started = time.perf_counter()
            result = forward_backward(variant, inputs, grad, lengths)
            first_call[name] = time.perf_counter() - started
        except Exception as error:  # noqa: BLE001
            print(f"{name}: {type(error).__name__}: {str(error)[:160]}")
            del variants[name]
            continue
        differences[name] = max(float((a.float() - b.float()).abs().max()) for a, b in zip(result, reference))
        errors[name] = max(float((a.double() - b).abs().max()) for a, b in zip(result[1:], exact[1:]))
    times = {name: [] for name in variants}
    clock = time.process_time if args.cpu_time else time.perf_counter
    for _ in range(args.repeats):
        for name, variant in variants.items():
            started = clock()
            forward_backward(variant, inputs, grad, lengths)
            times[name].append(clock() - started)
    today = statistics.median(times["per-document flash (today)"])
    print(f"lengths {lengths} ({total} tokens), {HEADS} heads, {KV_HEADS} KV heads, dim {DIM}, bfloat16, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    print("\n| variant | forward + backward (ms, median) | speed vs today | largest difference | gradient error vs "
          "float64 | first call (s) |\n|---|---|---|---|---|---|")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"| {name} | {1000 * median:.1f} | {today / median:.2f}× | {differences[name]:.3f} | "
              f"{errors[name]:.3f} | {first_call[name]:.1f} |")


if __name__ == "__main__":
    main()
