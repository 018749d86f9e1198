"""Plan against measured runs: the table of docs/plan.md, as ratios measured in one run.

    PYTHONPATH=src python benchmarks/plan_vs_measured.py [--model smollm2-135m-instruct] [--steps 8]

For each layout (packing on/off, activation checkpointing on/off) and method (LoRA r=16, LoRA
r=64, full fine-tuning) the recipe is planned as ``tunesmith plan`` plans it (its own calibration:
a few timed steps in a fresh process, timed again here, never taken from the cache), and then run
for real for --steps steps in a fresh process, with a validation pass halfway and at the end.
Printed per configuration, with the ratio estimate / measured:

- peak memory (whole-process peak resident memory on CPU, as summary.json reports it);
- seconds per step (the measured median of the logged steps after the first);
- the whole run (the wall time of the ``tunesmith train`` process: start, steps, validation, save);
- for the methods other than LoRA r=16, the step time scaled by FLOPs from LoRA r=16's
  calibration (what ``tunesmith plan --methods all`` prints for them, marked ``*``).

The load average is printed before and after: the ratios mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from tunesmith.config import validate_recipe
from tunesmith.workflows.plan import calibrate_time, plan_recipe

REPO = Path(__file__).resolve().parents[1]
METHODS = {"lora r=16": {"kind": "lora", "r": 16, "alpha": 32}, "lora r=64": {"kind": "lora", "r": 64, "alpha": 128},
           "full": {"kind": "full"}}
LAYOUTS = {"packed": {"packing": True}, "padded": {"packing": False},
           "packed + checkpointing": {"packing": True, "activation_checkpointing": True},
           "padded + checkpointing": {"packing": False, "activation_checkpointing": True}}


def recipe_dict(model: str, method: dict, speed: dict, steps: int, out: Path, batch: int, length: int) -> dict:
    return {"model": {"name": model},
            "data": {"train": str(REPO / "examples/data/tiny/train.jsonl"),
                     "validation": str(REPO / "examples/data/tiny/validation.jsonl"), "max_length": length},
            "method": method, "train": {"max_steps": steps, "batch_size": batch, "lr": 1e-4, "log_every": 1,
                                        "speed": speed},
            "eval": {"every_steps": max(1, steps // 2)}, "output": {"dir": str(out), "overwrite": True}}


def measure(raw: dict, folder: Path) -> tuple[float, float, float]:
    """(peak MB, median seconds per step after the first, wall seconds) of a real run in a fresh process."""
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path), "--no-progress"],
                          capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stderr[-2000:])
    out = Path(raw["output"]["dir"])
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds = [s["step_s"] for s in steps if "step_s" in s][1:]
    return json.loads((out / "summary.json").read_text())["peak_memory_mb"], statistics.median(seconds), wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args()
    quiet = lambda *a: None  # noqa: E731
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; {args.model}, batch {args.batch} x "
          f"{args.length} tokens, {args.steps} steps")
    print("| layout | method | memory est. | measured | ratio | s/step est. | measured | ratio | run est. | measured | "
          "ratio | s/step scaled from lora r=16 | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for layout in args.layouts.split(","):
            speed = LAYOUTS[layout]
            lora = validate_recipe(recipe_dict(args.model, METHODS["lora r=16"], speed, args.steps, folder / "run",
                                               args.batch, args.length))
            reference = calibrate_time(lora, say=quiet, cached=False)
            for label in args.methods.split(","):
                raw = recipe_dict(args.model, METHODS[label], speed, args.steps, folder / "run", args.batch, args.length)
                recipe = validate_recipe(raw)
                own = reference if label == "lora r=16" else calibrate_time(recipe, say=quiet, cached=False)
                plan = plan_recipe(recipe, calibration=own, say=quiet).methods[0]
                scaled = "" if label == "lora r=16" else \
                    plan_recipe(recipe, calibration=reference, say=quiet).methods[0].seconds_per_step
                peak_mb, seconds, wall = measure(raw, folder)
                estimate_mb = plan.memory.total / 2**20
                scaled_cells = "| |" if scaled == "" else f"| {scaled:.2f} | {scaled / seconds:.2f} |"
                print(f"| {layout} | {label} | {estimate_mb:.0f} MB | {peak_mb:.0f} MB | {estimate_mb / peak_mb:.2f} | "
                      f"{plan.seconds_per_step:.2f} | {seconds:.2f} | {plan.seconds_per_step / seconds:.2f} | "
                      f"{plan.run_seconds:.0f} s | {wall:.0f} s | {plan.run_seconds / wall:.2f} {scaled_cells}",
                      flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
