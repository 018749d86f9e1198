"""tunesmith's MMLU scoring against lm-evaluation-harness 0.4 on the same files: same numbers, how much faster.

One invocation loads the model once, writes lm-eval task YAMLs over the MMLU CSV files
(lm-eval's own MMLU prompt), and scores the same questions with lm-eval's ``HFLM`` and with
tunesmith, alternating the two ``--repeats`` times; it prints per subject the accuracies of both,
the largest per-document log-likelihood difference, and questions/s of each with their ratio
(best of the repeats). Then greedy generation: tunesmith's generation path against a plain
batched ``model.generate`` on the same prompts, new tokens/s and time to the first token.

    pip install 'tunesmith[lm-eval]'
    python benchmarks/eval_speed.py                                   # SmolLM2-135M, 3 subjects x 20, 5-shot
    python benchmarks/eval_speed.py --model stories260k-folder --limit 10 --few-shot 0

On a shared machine only the ratios measured in one run mean anything.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from tunesmith.evaluation.benchmarks import read_mmlu  # noqa: E402  (after the path is set)
from tunesmith.evaluation.harness import harness_documents, write_mmlu_task_yamls  # noqa: E402
from tunesmith.evaluation.multiple_choice import PromptStyle, evaluate_multiple_choice  # noqa: E402
from tunesmith.inference.generate import load_for_inference  # noqa: E402

DESCRIPTION = "The following are multiple choice questions (with answers) about {group}.\n\n"
ASSETS = Path(os.environ.get("TUNESMITH_TEST_ASSETS", REPO.parent / "shared" / "assets"))  # as the tests find it


def score_both(model, tokenizer, folder: Path, subjects: tuple[str, ...], limit: int, few_shot: int,
               batch_size: int, repeats: int) -> dict:
    """Per-subject agreement and the best time of each tool over ``repeats`` alternating runs."""
    items = read_mmlu(folder, "test", subjects, limit)
    pool = read_mmlu(folder, "dev", subjects)
    style = PromptStyle("letter", description=DESCRIPTION)
    times = {"lm-eval": [], "tunesmith": []}
    with tempfile.TemporaryDirectory() as include:
        names = write_mmlu_task_yamls(folder, include, subjects)
        for _ in range(repeats):
            started = time.perf_counter()
            reference = harness_documents(model, tokenizer, names, include, few_shot, limit, batch_size)
            times["lm-eval"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ours = evaluate_multiple_choice(model, tokenizer, items, few_shot=few_shot, few_shot_pool=pool,
                                            style=style, batch_size=batch_size)
            times["tunesmith"].append(time.perf_counter() - started)
    rows, index = [], 0
    for name, subject in zip(names, subjects):
        documents = reference[name]
        span = range(index, index + len(documents))
        index += len(documents)
        worst = max(abs(a.logprob - b) for i, d in zip(span, documents) for a, b in zip(ours.scores[i], d["logprobs"]))
        rows.append({"subject": subject, "count": len(documents),
                     "tunesmith_acc": sum(ours.predictions["sum"][i] == items[i].answer for i in span),
                     "lm_eval_acc": int(sum(d["acc"] for d in documents)),
                     "tunesmith_acc_norm": sum(ours.predictions["per_char"][i] == items[i].answer for i in span),
                     "lm_eval_acc_norm": int(sum(d["acc_norm"] for d in documents)),
                     "max_logprob_difference": worst})
    return {"rows": rows, "questions": len(items), "seconds": {k: min(v) for k, v in times.items()}}


@torch.no_grad()
def generation_ratio(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int) -> dict:
    """New tokens/s and time to first token: tunesmith's generation against plain ``model.generate``."""
    from tunesmith.inference.generate import generate

    conversations = [[{"role": "user", "content": p}] for p in prompts]

    def plain(new_tokens: int) -> int:
        tokenizer.padding_side = "left"
        produced = 0
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                     for c in conversations[start : start + batch_size]]
            inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            output = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
            produced += int((output[:, inputs["input_ids"].shape[1]:] != tokenizer.pad_token_id).sum())
        return produced

    def ours(new_tokens: int) -> int:
        replies = generate(model, tokenizer, conversations, new_tokens, batch_size=batch_size)
        return sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in replies)

    result = {}
    for name, run in (("model.generate", plain), ("tunesmith", ours)):
        started = time.perf_counter()
        run(1)
        first = time.perf_counter() - started
        started = time.perf_counter()
        tokens = run(max_new_tokens)
        result[name] = {"tokens_per_s": tokens / (time.perf_counter() - started), "first_token_s": first}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mmlu", default=str(ASSETS / "data" / "mmlu"))
    parser.add_argument("--subjects", default="high_school_geography,us_foreign_policy,marketing")
    parser.add_argument("--limit", type=int, default=20, help="Questions per subject.")
    parser.add_argument("--few-shot", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--generation-prompts", type=int, default=8, help="0: skip the generation ratio.")
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_for_inference(args.model)
    subjects = tuple(args.subjects.split(","))
    result = score_both(model, tokenizer, Path(args.mmlu), subjects, args.limit, args.few_shot, args.batch_size,
                        args.repeats)
    print(f"\nMMLU {args.few_shot}-shot, {args.model}, {result['questions']} questions")
    print("| subject (n) | tunesmith acc | lm-eval acc | tunesmith acc_norm | lm-eval acc_norm | largest logprob difference |")
    print("|---|---|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['subject']} ({row['count']}) | {row['tunesmith_acc']} | {row['lm_eval_acc']} | "
              f"{row['tunesmith_acc_norm']} | {row['lm_eval_acc_norm']} | {row['max_logprob_difference']:.1e} |")
    rates = {k: result["questions"] / v for k, v in result["seconds"].items()}
    print(f"questions/s: tunesmith {rates['tunesmith']:.2f}, lm-eval {rates['lm-eval']:.2f}, "
          f"ratio {rates['tunesmith'] / rates['lm-eval']:.2f}x")
    if args.generation_prompts:
        from tunesmith.evaluation.benchmarks import read_records

        records = read_records(ASSETS / "data" / "gsm8k" / "test.jsonl", ("question",), args.generation_prompts)
        generation = generation_ratio(model, tokenizer, [r["question"] for _, r in records], 32, args.batch_size)
        ours, plain = generation["tunesmith"], generation["model.generate"]
        print(f"generation ({args.generation_prompts} GSM8K prompts, 32 new tokens, batch {args.batch_size}): "
              f"tokens/s tunesmith {ours['tokens_per_s']:.1f}, model.generate {plain['tokens_per_s']:.1f}, "
              f"ratio {ours['tokens_per_s'] / plain['tokens_per_s']:.2f}x; first token {ours['first_token_s']:.2f}s "
              f"vs {plain['first_token_s']:.2f}s")


if __name__ == "__main__":
    main()
