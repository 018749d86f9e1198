"""Plan against measured runs: the table of docs/plan.md.

    PYTHONPATH=src python benchmarks/plan_vs_measured.py [--model smollm2-135m-instruct] [--steps 8]

For each layout (packing on/off, activation checkpointing on/off) the LoRA r=16 recipe is
calibrated once (a few timed steps); then LoRA r=16, LoRA r=64 and full fine-tuning are each
planned (their step time scaled from that calibration by FLOPs) and run for real for --steps
steps in a fresh process. Printed: estimated and measured peak memory (whole-process peak
resident memory on CPU) and seconds per step (median, first step left out), and the ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from tunesmith.config import validate_recipe
from tunesmith.plan import calibrate_time, plan_recipe

REPO = Path(__file__).resolve().parents[1]
METHODS = {"lora r=16": {"kind": "lora", "r": 16, "alpha": 32}, "lora r=64": {"kind": "lora", "r": 64, "alpha": 128},
           "full": {"kind": "full"}}
LAYOUTS = {"packed": {"packing": True}, "padded": {"packing": False},
           "packed + checkpointing": {"packing": True, "activation_checkpointing": True},
           "padded + checkpointing": {"packing": False, "activation_checkpointing": True}}


def recipe_dict(model: str, method: dict, speed: dict, steps: int, out: Path, batch: int, length: int) -> dict:
    return {"model": {"name": model},
            "data": {"train": str(REPO / "examples/data/tiny/train.jsonl"), "max_length": length},
            "method": method, "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "log_every": 1,
                                        "speed": speed}, "output": {"dir": str(out), "overwrite": True}}


def measure(raw: dict, folder: Path) -> tuple[float, float]:
    """(peak MB, median seconds per step) of a real run in a fresh process."""
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path), "--no-progress"],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    out = Path(raw["output"]["dir"])
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [s["tokens"] / s["tokens_per_s"] for s in steps if "tokens_per_s" in s][1:]
    return json.loads((out / "summary.json").read_text())["peak_memory_mb"], statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    print("| layout | method | memory est. | measured | ratio | s/step est. | measured | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for layout in args.layouts.split(","):
            speed = LAYOUTS[layout]
            base = recipe_dict(args.model, METHODS["lora r=16"], speed, args.steps, folder / "run", args.batch, args.length)
            calibration = calibrate_time(validate_recipe(base), say=lambda *a: None)
            for label in args.methods.split(","):
                method = METHODS[label]
                raw = recipe_dict(args.model, method, speed, args.steps, folder / "run", args.batch, args.length)
                plan = plan_recipe(validate_recipe(raw), calibration=calibration, say=lambda *a: None).methods[0]
                peak_mb, seconds = measure(raw, folder)
                estimate_mb = plan.memory.total / 2**20
                print(f"| {layout} | {label} | {estimate_mb:.0f} MB | {peak_mb:.0f} MB | {estimate_mb / peak_mb:.2f} | "
                      f"{plan.seconds_per_step:.2f} | {seconds:.2f} | {plan.seconds_per_step / seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
