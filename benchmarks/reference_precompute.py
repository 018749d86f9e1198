"""Step time of DPO/KTO with the reference computed on the fly against ``stage.precompute_reference: true``.

    python benchmarks/reference_precompute.py                                  # SmolLM2-135M-Instruct, LoRA r=16
    python benchmarks/reference_precompute.py --model PATH/TO/stories260k --steps 6 --rounds 2

Both settings run in this one process, alternately (``--rounds`` times each), so a busy machine slows
both alike; the figure is the RATIO of median step times (steps after the first of each run), plus
the one-off precomputation time (the
precomputed runs' set-up time minus the on-the-fly runs'). Results: docs/stages.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "shared" / "assets" / "data" / "llama_factory"
DATA = {"dpo": "dpo_en_demo.json", "kto": "kto_en_demo.json"}


def run(stage: str, model: str, steps: int, precompute: bool, out: Path, max_length: int, batch_size: int,
        autocast: str) -> tuple[list[float], float]:
    """(step times after the first, seconds before the first step) of one run."""
    from tunesmith.config import validate_recipe
    from tunesmith.pipeline.finetune import finetune

    recipe = validate_recipe({
        "stage": {"kind": stage, "precompute_reference": precompute}, "model": {"name": model},
        "data": {"train": str(ASSETS / DATA[stage]), "max_length": max_length},
        "method": {"kind": "lora", "r": 16, "alpha": 32},
        "train": {"max_steps": steps, "batch_size": batch_size, "log_every": 1, "speed": {"autocast": autocast}},
        "output": {"dir": str(out), "overwrite": True}})
    started = time.perf_counter()
    summary = finetune(recipe, progress=False)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_s"] for r in records if "step_s" in r]
    return step_times[1:], time.perf_counter() - started - summary.get("wall_time_s", sum(step_times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--stages", default="dpo,kto")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--autocast", default="auto")
    args = parser.parse_args()
    print("| stage | median step, reference on the fly | median step, precomputed | ratio | precomputation (extra set-up time) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for stage in args.stages.split(","):
            times: dict[bool, list[float]] = {False: [], True: []}
            setup: dict[bool, list[float]] = {False: [], True: []}
            for round_ in range(args.rounds):
                for precompute in (False, True):
                    steps, before = run(stage, args.model, args.steps, precompute, Path(folder) / f"{stage}-{round_}",
                                        args.max_length, args.batch_size, args.autocast)
                    times[precompute] += steps
                    setup[precompute].append(before)
            plain, precomputed = statistics.median(times[False]), statistics.median(times[True])
            print(f"| {stage} | {plain:.3f} s | {precomputed:.3f} s | {plain / precomputed:.2f}x | "
                  f"{statistics.median(setup[True]) - statistics.median(setup[False]):.1f} s |", flush=True)


if __name__ == "__main__":
    main()
