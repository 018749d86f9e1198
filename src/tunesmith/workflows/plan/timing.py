"""Time per step and for the run: the run's steps drawn by its own sampler, a cached calibration, FLOPs scaling."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

from tunesmith.config import Recipe, recipe_to_yaml
from tunesmith.core.errors import TunesmithError
from tunesmith.core.run_files import RunLayout
from tunesmith.core.runtime import cache_dir
from tunesmith.data import encode_data
from tunesmith.models import resolve_model_path
from tunesmith.models.loading import load_tokenizer
from tunesmith.training.sampler import build_sampler

CALIBRATION_STEPS = 4  # timed steps of the calibration run (the first is left out as warm-up)
CALIBRATION_FORMAT = 2  # 2: per-step times from step_s, rates per computed token, start-up timed
COSTED_STEPS = 2000  # the mean step is drawn from at most this many of the run's steps


def run_steps(recipe: Recipe, examples: int) -> int:
    """Optimizer steps of the run, as the loop counts them."""
    global_batch = recipe.train.batch_size * recipe.train.grad_accum
    if recipe.train.max_steps:
        return recipe.train.max_steps
    return max(1, round(recipe.train.epochs * max(1, examples // global_batch)))


def largest_micro_batch_tokens(recipe: Recipe, lengths: list[int], steps: int) -> int:
    """Tokens of the largest micro-batch the run will see (its activations set the peak).

    Packed: the sum of the micro-batch's lengths; padded: its size times its longest example.
    Drawn by the run's own sampler (training/sampler.py) for the run's steps, at the recipe's seed.
    """
    return max((max(micro, default=0) for micro in micro_batch_costs(recipe, lengths, steps)), default=0)


def step_costs(recipe: Recipe, lengths: list[int], steps: int) -> list[int]:
    """Tokens each optimizer step computes, padding included, drawn by the run's own sampler.

    Packed: the sum of the step's lengths; padded: each micro-batch's size times its longest example
    (regrouped by length as the run does). Step time follows these, not the real tokens alone.
    """
    return [sum(micro) for micro in micro_batch_costs(recipe, lengths, steps)]


def micro_batch_costs(recipe: Recipe, lengths: list[int], steps: int) -> list[list[int]]:
    """Per optimizer step, the tokens each of its micro-batches computes, as training/sampler.py draws them."""

    train = recipe.train
    packed = train.speed.packing
    grouped = train.speed.group_by_length and not packed and train.grad_accum > 1  # as apply_speed decides
    sampler = build_sampler(len(lengths), (), train.batch_size, train.grad_accum, 1, 0, train.seed,
                            lengths if grouped else None)
    costs = []
    for step in range(steps):
        micro = [[lengths[i] for i in indices] for indices in sampler.micro_batches(step)]
        costs.append([sum(m) if packed else len(m) * max(m) for m in micro if m])
    return costs


def validation_costs(recipe: Recipe, data) -> int:
    """Tokens one validation pass computes: batches of ``eval.batch_size`` in order, each padded to its longest."""
    examples = list(data.validation or ())
    batch = recipe.eval.batch_size
    return sum(len(chunk) * max(len(e.input_ids) for e in chunk)
               for chunk in (examples[i:i + batch] for i in range(0, len(examples), batch)))


def other_seconds(recipe: Recipe, calibration: dict, per_token: float, first_cost: int, validation_tokens: int,
                  forward_share: float, steps: int) -> float:
    """What a run spends besides its steps' median time: start, warm-up and validation passes.

    - start: imports, model load, data preparation and the final save, timed in the calibration
      (its whole wall time less its training loop);
    - warm-up: the first step takes longer (allocator, kernels chosen, lazy initialisation): its excess
      over the calibrated rate, as the calibration measured it;
    - validation: ``steps // eval.every_steps`` passes during the run and one at its end (where
      there is validation data), each the validation tokens at the forward's share of a step's cost.
    """
    start = calibration.get("startup_seconds", 0.0)
    first = calibration.get("first_step_seconds")
    calibration_first_cost = (calibration.get("step_costs") or [first_cost])[0]
    warm_up = max(0.0, first - per_token * calibration_first_cost) if first is not None else 0.0
    passes = 0
    if validation_tokens:
        passes = 1 + (steps // recipe.eval.every_steps if recipe.eval.every_steps else 0)
    return start + warm_up + passes * validation_tokens * per_token * forward_share


def matmul_flops_per_token(kind: str, trainable: int, total: int, checkpointing: bool) -> float:
    """Matrix-product FLOPs per token of one training step (PERF-NOTES.md's formulas).

    Forward 2N, gradient of the inputs 2N, gradients of trained weights 2 per trained weight; full
    and partial train base weights, the adapters' own weights are few. Checkpointing adds a forward.
    """
    forward = 2 * total
    weight_gradients = 2 * trainable
    return forward * (2 if checkpointing else 1) + 2 * total + weight_gradients


def scaled_token_seconds(calibration: dict, kind: str, trainable: int, total: int, recipe: Recipe,
                         costs: list[int]) -> Optional[float]:
    """Seconds per computed token of a step: the calibrated method's, scaled by FLOPs for another method.

    The calibration ran the run's first steps (same data, seed and batch layout), so its steps
    computed ``costs[:CALIBRATION_STEPS]`` tokens; a calibration from before this was recorded
    (no ``step_costs``) is read as seconds per step of the mean step.
    """
    if not calibration:
        return None
    checkpointing = recipe.train.speed.activation_checkpointing
    own = matmul_flops_per_token(kind, trainable, total, checkpointing)
    reference = matmul_flops_per_token(calibration["method"], calibration["trainable"], calibration["total"],
                                       checkpointing)
    if "seconds_per_token" in calibration:
        per_token = calibration["seconds_per_token"]
    else:
        per_token = calibration["seconds_per_step"] / statistics.fmean(costs)
    return per_token * own / reference


def calibrate_time(recipe: Recipe, say=print, costs: Optional[list[int]] = None, cached: bool = True) -> dict:
    """Time a few steps of the recipe in a subprocess (cached by recipe, machine and library versions).

    Args:
        costs: Tokens each of the run's first steps computes (:func:`step_costs`); default: read
            from the calibration's own data (prepared again here).
        cached: Reuse a cached calibration; False times it again (and replaces the cached one).

    Returns:
        ``{"method", "seconds_per_token", "seconds_per_step", "first_step_seconds", "startup_seconds",
        "step_costs", "trainable", "total", "peak_memory_mb", "cached"}``.
    """
    key = calibration_key(recipe)
    cache = cache_dir() / "plan" / f"calibration-{key}.json"
    if cached and cache.is_file():
        return {**json.loads(cache.read_text()), "cached": True}
    with tempfile.TemporaryDirectory(prefix="tunesmith-plan-") as folder:
        recipe_file = Path(folder) / "recipe.yaml"
        recipe_file.write_text(calibration_recipe(recipe, Path(folder) / "run"))
        say(f"calibrating: {CALIBRATION_STEPS} timed steps of the recipe ...")
        started = time.perf_counter()
        completed = subprocess.run([sys.executable, "-m", "tunesmith", "train", str(recipe_file), "--no-progress"],
                                   capture_output=True, text=True, env={**os.environ})
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            tail = (completed.stderr or completed.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TunesmithError(f"the calibration run of the recipe failed: {tail[0]}")
        run = RunLayout(Path(folder) / "run")
        steps = [s for s in run.read_metrics() if "step_s" in s and "step" in s]
        summary = run.read_summary()
        if summary is None:
            raise TunesmithError(f"the calibration run of the recipe wrote no {run.summary.name}; run it with tunesmith train to see why")
    if costs is None:
        costs = calibration_costs(recipe)
    costs = costs[:len(steps)]
    # step_s is each step's own time; the records' "tokens" are cumulative (tokens/tokens_per_s was
    # the step's time times its index: the old calibration's bias, 3x here against 5x in an 8-step run)
    timed = list(zip(steps, costs))[1:] or list(zip(steps, costs))
    per_token = statistics.median(record["step_s"] / cost for record, cost in timed)
    result = {"method": recipe.method.kind, "seconds_per_token": per_token,
              "seconds_per_step": statistics.median(record["step_s"] for record, _ in timed),
              "first_step_seconds": steps[0]["step_s"], "step_costs": costs,
              "step_seconds": [record["step_s"] for record in steps], "train_seconds": summary.wall_time_s,
              "step_tokens": [b - a for a, b in zip([0] + [r["tokens"] for r in steps], [r["tokens"] for r in steps])],
              "startup_seconds": max(0.0, wall - summary.wall_time_s),
              "trainable": summary.trainable_parameters, "total": summary.total_parameters,
              "steps_timed": len(timed), "peak_memory_mb": summary.peak_memory_mb}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    return {**result, "cached": False}


def calibration_costs(recipe: Recipe) -> list[int]:
    """:func:`step_costs` of the calibration's steps, from the recipe's data prepared here."""

    tokenizer = load_tokenizer(resolve_model_path(recipe.model.name, cache_dir()), recipe.model)
    data = encode_data(recipe.data, tokenizer, recipe.train.seed)
    return step_costs(recipe, [len(e.input_ids) for e in data.train], CALIBRATION_STEPS)


def calibration_recipe(recipe: Recipe, out: Path) -> str:
    """The recipe cut to a few logged steps, nothing evaluated or checkpointed, into ``out``."""
    import yaml


    raw = yaml.safe_load(recipe_to_yaml(recipe))
    raw["train"].update(max_steps=CALIBRATION_STEPS, log_every=1, checkpoint_every=None, early_stopping=None)
    raw["eval"].update(every_steps=None, task=None, report=None)
    raw["output"].update(dir=str(out), overwrite=True, tensorboard=False)
    raw["retain"] = None
    return yaml.safe_dump(raw)


def calibration_key(recipe: Recipe) -> str:
    """What the step time depends on: the model, method, batch layout, speed options and this machine."""
    parts = {"format": CALIBRATION_FORMAT, "model": recipe.model.model_dump(mode="json"), "method": recipe.method.model_dump(mode="json"),
             "data": recipe.data.model_dump(mode="json"), "batch": recipe.train.batch_size,
             "accum": recipe.train.grad_accum, "speed": recipe.train.speed.model_dump(mode="json"),
             "device": recipe.train.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
             "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
