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
    for _ in range(args.repeats):
        for name, variant in variants.items():
            started = time.perf_counter()
            forward_backward(variant, inputs, grad, lengths)
            times[name].append(time.perf_counter() - started)
    today = statistics.median(times["per-document flash (today)"])
    print(f"lengths {lengths} ({total} tokens), {HEADS} heads, {KV_HEADS} KV heads, dim {DIM}, bfloat16, "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    print("\n| variant | forward + backward (ms, median) | speed vs today | largest difference | gradient error vs "
          "float64 | first call (s) |\n|---|---|---|---|---|---|")
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"| {name} | {1000 * median:.1f} | {today / median:.2f}× | {differences[name]:.3f} | "
              f"{errors[name]:.3f} | {first_call[name]:.1f} |")


if __name__ == "__main__":
    main()
