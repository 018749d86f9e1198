"""How far a model as judge can be trusted: agreement with human preferences and with itself across orders.

    python benchmarks/judge_agreement.py --assets ../shared/assets --pairs 100 --judge smollm2-135m-instruct
    python benchmarks/judge_agreement.py ... --tuned RUN --held-out examples/data/quickstart/test.jsonl

HH-RLHF (harmless-base test split, Anthropic, MIT): each record is one dialogue ending in two assistant
replies, the one human raters chose and the one they rejected. The judge sees the dialogue up to the
last human turn and the two replies, in both orders (tunesmith.evaluation.judge.judge_pairs, the
chosen reply as "A"); agreement with humans is the share of valid pairs where the chosen reply wins
(ties counted as half), and self-agreement the share of pairs whose two orders gave the same verdict.
Pairs are the first ``--pairs`` of the file whose dialogue is at most ``--max-chars`` characters
(a small judge on a CPU). Both verdict methods run: ``logprob`` (the most likely [[A]]/[[B]]/[[C]])
and ``generate`` (the verdict written and parsed strictly).

With ``--tuned RUN --held-out FILE``: the tuned model's and its base's greedy answers to the held-out
prompts (instruction + input), judged pairwise by the same judge: the win-rate table.
Timings are not the point here; the machine was shared when the figures in docs/evaluation.md were taken.
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

LAST_ASSISTANT = "\n\nAssistant:"


def hh_pairs(path: Path, count: int, max_chars: int) -> list[tuple[str, str, str]]:
    """(dialogue up to the last human turn, chosen reply, rejected reply) for the first suitable records."""
    pairs = []
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            chosen_at, rejected_at = record["chosen"].rfind(LAST_ASSISTANT), record["rejected"].rfind(LAST_ASSISTANT)
            prefix = record["chosen"][:chosen_at]
            if prefix != record["rejected"][:rejected_at]:
                continue
            chosen = record["chosen"][chosen_at + len(LAST_ASSISTANT):].strip()
            rejected = record["rejected"][rejected_at + len(LAST_ASSISTANT):].strip()
            dialogue = prefix.strip().replace("\n\nHuman:", "\nHuman:").replace("\n\nAssistant:", "\nAssistant:")
            if not chosen or not rejected or chosen == rejected or len(dialogue) + len(chosen) + len(rejected) > max_chars:
                continue
            pairs.append((dialogue, chosen, rejected))
            if len(pairs) >= count:
                break
    return pairs


def agreement_row(name: str, judgements, seconds: float) -> dict:
    from tunesmith.evaluation.judge_stats import bootstrap_interval, order_agreement, win_rate

    outcomes = [j.outcome for j in judgements]
    valid = [o for o in outcomes if o != "invalid"]
    values = [{"win": 1.0, "tie": 0.5, "loss": 0.0}[o] for o in valid]
    first_position = [p for j in judgements for p in (j.parsed[0],) if p in ("A", "B")]
    second_position = [p for j in judgements for p in (j.parsed[1],) if p in ("A", "B")]
    picks_first = first_position.count("A") + second_position.count("A")
    low, high = bootstrap_interval(values)
    decisive = [o for o in valid if o != "tie"]
    return {"method": name, "pairs": len(judgements), "valid": len(valid),
            "human_agreement": win_rate(outcomes), "ci": [low, high],
            "decisive_agreement": (decisive.count("win") / len(decisive)) if decisive else None,
            "ties": valid.count("tie"), "order_agreement": order_agreement([j.consistent for j in judgements]),
            "first_position_share": picks_first / max(1, len(first_position) + len(second_position)),
            "seconds": round(seconds, 1)}


def held_out_prompts(path: Path, limit: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    return [f"{r['instruction']}\n\n{r['input']}" if r.get("input") else r["instruction"] for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--assets", default="../shared/assets")
    parser.add_argument("--judge", default="smollm2-135m-instruct")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--generate-pairs", type=int, default=40, help="pairs for the (slower) generate method")
    parser.add_argument("--max-chars", type=int, default=1500)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--tuned", help="a run folder: its answers against its base's on --held-out")
    parser.add_argument("--held-out")
    parser.add_argument("--held-out-limit", type=int, default=50)
    parser.add_argument("--methods", default="logprob,generate", help="verdict methods, comma-separated")
    parser.add_argument("--skip-agreement", action="store_true", help="only the win-rate table")
    parser.add_argument("--out", default="judge_agreement.json")
    args = parser.parse_args()

    from tunesmith.evaluation.judge import LocalJudge, judge_pairs
    from tunesmith.inference.generate import load_for_inference

    model, tokenizer = load_for_inference(args.judge)
    pairs = hh_pairs(Path(args.assets) / "data/hh_rlhf/harmless-base-test.jsonl.gz", args.pairs, args.max_chars)
    report: dict = {"judge": args.judge, "data": "HH-RLHF harmless-base test", "rows": []}
    methods = args.methods.split(",")
    stages = [] if args.skip_agreement else [(m, args.pairs if m == "logprob" else args.generate_pairs) for m in methods]
    for method, count in stages:
        judge = LocalJudge(model, tokenizer, args.judge, method, args.max_new_tokens, batch_size=8)
        chosen_pairs = pairs[:count]
        started = time.perf_counter()
        judgements = judge_pairs(judge, [p[0] for p in chosen_pairs], [p[1] for p in chosen_pairs],
                                 [p[2] for p in chosen_pairs])
        row = agreement_row(method, judgements, time.perf_counter() - started)
        row["example_verdicts"] = [list(j.raw) for j in judgements[:3]]
        report["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "example_verdicts"}), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=1))  # what is done so far, after each stage

    if args.tuned and args.held_out:
        from tunesmith.evaluation.judge_task import answer, pairwise_result
        from tunesmith.inference.results import locate_result

        prompts = held_out_prompts(Path(args.held_out), args.held_out_limit)
        tuned_model, tuned_tokenizer = load_for_inference(args.tuned)
        base_name = locate_result(args.tuned).recorded_base
        base_model, base_tokenizer = load_for_inference(base_name)
        system = "You are a helpful assistant."  # the quick start's data.system_prompt
        tuned_answers = answer(tuned_model, tuned_tokenizer, prompts, 16, 16, system)
        base_answers = answer(base_model, base_tokenizer, prompts, 16, 16, system)
        report["win_rate"] = {}
        for method in methods:
            judge = LocalJudge(model, tokenizer, args.judge, method, args.max_new_tokens, batch_size=8)
            result = pairwise_result(judge_pairs(judge, prompts, tuned_answers, base_answers), args.judge)
            report["win_rate"][method] = {"metrics": result["metrics"], "samples": result["samples"]}
            print(json.dumps({"win_rate": method, **result["metrics"]}), flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
