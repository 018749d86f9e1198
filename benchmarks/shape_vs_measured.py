"""``tunesmith plan --shape`` against measured runs of random-weight models of published shapes (docs/plan.md).

    PYTHONPATH=src python benchmarks/shape_vs_measured.py [--shapes smollm2-1.7b qwen2.5-3b] [--kinds lora qlora]

For each shape (models/shapes.py) a random-weight model is written once in bfloat16 (speed and memory do not
depend on the weights' values) with SmolLM2-135M-Instruct's tokenizer, then for each kind (bf16 LoRA r=16:
``model.dtype: bfloat16``; QLoRA: ``model.quantize: nf4``) trained for --steps steps with ``tunesmith train`` in
a fresh process, ONE AT A TIME (free memory is printed first). The plan is :func:`plan_shape` for the run's own
largest micro-batch (drawn as the run draws it). Printed per run: planned peak (for QLoRA the larger of
the load peak and the training peak with the checkpoint still mapped, plan/memory.py: resident_peak), measured peak (whole-process peak resident memory,
summary.json), their ratio, and tokens per second. The load average is printed: on a busy
machine (as when the table in docs/plan.md was taken) the times are noise, the memory is not.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
KINDS = {"lora": ({"dtype": "bfloat16"}, "bf16 LoRA r=16"),
         "qlora": ({"quantize": "nf4", "dtype": "bfloat16"}, "QLoRA nf4 r=16")}


def write_model(name: str, folder: Path) -> Path:
    """The shape with random bfloat16 weights and SmolLM2's tokenizer, saved once into ``folder``."""
    from tunesmith.config import ModelSection
    from tunesmith.core.runtime import cache_dir
    from tunesmith.models import ALIASES
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.models.shapes import shape_config, write_random_checkpoint

    target = folder / name
    if (target / "tokenizer_config.json").is_file():
        return target
    write_random_checkpoint(shape_config(name), target)  # shard by shard: never the whole model in memory
    smollm2 = ALIASES.get("smollm2-135m-instruct").materialise(cache_dir())
    load_tokenizer(str(smollm2), ModelSection()).save_pretrained(target)
    return target


def recipe(model: Path, kind: str, steps: int, out: Path) -> dict:
    extra, _ = KINDS[kind]
    return {"model": {"name": str(model), **extra},
            "data": {"train": str(REPO / "examples/data/tiny/train.jsonl"), "max_length": 256},
            "method": {"kind": "lora", "r": 16, "alpha": 32},
            "train": {"max_steps": steps, "batch_size": 2, "lr": 1e-4, "log_every": 1},
            "eval": {"every_steps": None}, "output": {"dir": str(out), "overwrite": True}}


def largest_tokens(raw: dict) -> int:
    from tunesmith.config import validate_recipe
    from tunesmith.data import encode_data
    from tunesmith.models.loading import load_tokenizer
    from tunesmith.workflows.plan import largest_micro_batch_tokens

    parsed = validate_recipe(raw)
    tokenizer = load_tokenizer(parsed.model.name, parsed.model)
    data = encode_data(parsed.data, tokenizer, parsed.train.seed)
    return largest_micro_batch_tokens(parsed, [len(e.input_ids) for e in data.train], parsed.train.max_steps)


def main() -> None:
    from tunesmith.core.run_files import RunLayout
    from tunesmith.core.runtime import available_memory_bytes
    from tunesmith.models.shapes import shape_config
    from tunesmith.workflows.plan.shapes import plan_shape

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["smollm2-1.7b", "qwen2.5-3b"])
    parser.add_argument("--kinds", nargs="+", default=["lora", "qlora"], choices=sorted(KINDS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--models", default=str(Path(tempfile.gettempdir()) / "tunesmith-shapes"))
    args = parser.parse_args()
    print("| shape | option | micro-batch tokens | planned peak | measured peak | planned / measured | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for name in args.shapes:
        model = write_model(name, Path(args.models))
        for kind in args.kinds:
            out = Path(args.models) / f"run-{name}-{kind}"
            raw = recipe(model, kind, args.steps, out)
            tokens = largest_tokens(raw)
            free = available_memory_bytes(torch.device("cpu"))
            plan = plan_shape(shape_config(name), name, tokens, 16, free)
            option = next(o for o in plan.options if o.label == KINDS[kind][1])
            print(f"free {free / 2**30:.1f} GB, load {os.getloadavg()[0]:.1f}: {name} {kind}", file=sys.stderr)
            path = out.parent / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(raw))
            done = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(path), "--no-progress"],
                                  capture_output=True, text=True)
            summary = RunLayout(out).read_summary()
            if done.returncode != 0 or summary is None:
                print(f"| {name} | {option.label} | {tokens} | {option.resident_peak / 2**30:.2f} GB | failed: "
                      f"{(done.stderr or done.stdout).strip().splitlines()[-1:]} | | |")
                continue
            measured = summary.peak_memory_mb * 2**20
            print(f"| {name} | {option.label} | {tokens} | {option.resident_peak / 2**30:.2f} GB | "
                  f"{measured / 2**30:.2f} GB | {option.resident_peak / measured:.2f} | {summary.tokens_per_s:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
