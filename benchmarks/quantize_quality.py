"""What weight-only decoding (``tunesmith generate --quantize int8|int4``) costs in quality, measured.

    python benchmarks/quantize_quality.py                          # SmolLM2, int8 and int4, 40 Vicuna questions x 64 tokens, 16k tokens of text
    python benchmarks/quantize_quality.py --quantize int4 --prompts 10 --text-tokens 4096
    python benchmarks/quantize_quality.py --quantize int4 --noise 0.2   # weights moved off their 4-bit grid first
    python benchmarks/quantize_quality.py --quantize int4 --model ../shared/assets/models/stories260k

Two figures, float32 weights against each quantised twin (``tunesmith.inference.quantized``; ``--quantize``
names the kinds):

- greedy agreement: the same chat prompts (Vicuna's questions from the shared assets), ``--new-tokens`` greedy tokens each; how many replies are identical,
  and the mean share of each reply's tokens before its first difference (after a difference the two
  replies continue from different texts, so later tokens say nothing more);
- perplexity of held-out text (the shared assets' ``wiki_demo.txt``, Wikipedia, from its end), in
  windows of ``--window`` tokens, float32 against the twin.

SmolLM2-135M-Instruct here is converted from a Q4_1 GGUF (groups of 32 with a scale and a minimum): its
projections already sit on a 4-bit grid that int4's groups of 32 find again (all but the LM head, its tied
embedding: about 29 distinct values in a group of 32, and int4 keeps it in int8), so int4 looks nearly free on it.
``--noise S`` first adds Gaussian noise of S times each linear weight's own standard deviation to it (seeded),
which moves the weights off that grid; the noisy float32 model is then the reference, so the figures say
what int4 costs a model whose weights are not already 4-bit. A model without a chat template (stories260k)
is prompted with the questions' plain text.

The assets are a benchmark's input only; without them the script says so and stops.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

ASSETS = Path(os.environ.get("TUNESMITH_TEST_ASSETS", REPO.parent / "shared" / "assets"))


def agreement(model, tokenizer, questions: list[str], new_tokens: int, kinds: list[str]) -> dict:
    """Per kind: how many greedy replies equal float32's, and the mean share of tokens before the first difference."""
    from tunesmith.inference.decoding import decode

    if tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=True)["input_ids"] for q in questions]
    else:
        prompts = [tokenizer(q)["input_ids"] for q in questions]
    float32 = decode(model, [list(p) for p in prompts], new_tokens, max_rows=8)
    result = {"prompts": len(prompts)}
    for kind in kinds:
        quantised = decode(model, [list(p) for p in prompts], new_tokens, max_rows=8, quantize=kind)
        shares, identical = [], 0
        for ours, theirs in zip(float32, quantised):
            first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            identical += ours == theirs
            shares.append(first / max(len(ours), 1) if ours != theirs else 1.0)
        result[kind] = {"identical": identical, "mean_share_before_first_difference": sum(shares) / len(shares)}
    return result


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, window: int) -> float:
    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1][None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total, count = total + float(loss), count + chunk.shape[1] - 1
    return math.exp(total / count)


@torch.no_grad()
def add_noise(model, scale: float) -> None:
    """Move every linear weight off whatever grid it sat on: ``w += scale * std(w) * N(0, 1)``, seeded."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            weight = module.weight
            weight.add_(torch.randn(weight.shape, generator=generator) * (scale * float(weight.float().std())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--quantize", default="int8,int4", help="the kinds to measure, comma-separated")
    parser.add_argument("--noise", type=float, default=0.0,
                        help="add Gaussian noise of this many times each linear weight's standard deviation first")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--text-tokens", type=int, default=16384)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tunesmith.inference.generate import load_for_inference
    from tunesmith.inference.quantized import LAYERS, quantized_twin

    questions_file, text_file = ASSETS / "data/mtbench/vicuna_question.jsonl", ASSETS / "data/llama_factory/wiki_demo.txt"
    if not (questions_file.exists() and text_file.exists()):
        sys.exit(f"the shared assets are missing ({ASSETS}); set TUNESMITH_TEST_ASSETS")
    model, tokenizer = load_for_inference(args.model)
    if args.noise:
        add_noise(model, args.noise)
    questions = [json.loads(line)["turns"][0] for line in questions_file.read_text().splitlines()[: args.prompts]]
    kinds = args.quantize.split(",")
    text = text_file.read_text()
    ids = torch.tensor(tokenizer(text[-100_000:], add_special_tokens=False)["input_ids"][-args.text_tokens :])
    started = time.perf_counter()
    result = {"model": args.model, "noise": args.noise, "new_tokens": args.new_tokens, "text_tokens": int(ids.numel()),
              "window": args.window, **agreement(model, tokenizer, questions, args.new_tokens, kinds),
              "perplexity_float32": perplexity(model, ids, args.window)}
    for kind in kinds:
        twin = quantized_twin(model, kind)
        quantised = sum(isinstance(m, tuple(LAYERS.values())) for m in twin.modules())  # int4's head is int8
        linears = quantised + sum(type(m) is torch.nn.Linear for m in twin.modules())
        result[kind].update(quantised_layers=f"{quantised} of {linears}", perplexity=perplexity(twin, ids, args.window))
        result[kind]["perplexity_ratio"] = result[kind]["perplexity"] / result["perplexity_float32"]
    result["seconds"] = time.perf_counter() - started
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
