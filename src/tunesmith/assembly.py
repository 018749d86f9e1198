"""One assembly of a run: the loop's seams built once, from the parts of the recipe that decide them.

Each part is handed only its own section and contributes through one interface: the stage gives
the objective (using the speed levers), the data's sources and the speed options decide the
sampler, the safeguards give penalties, and the output section gives the hooks. The result is one
frozen :class:`~tunesmith.training.loop.LoopSeams` that the :class:`~tunesmith.training.loop.Trainer`
requires, plus the :class:`~tunesmith.training.speed.SpeedSetup` to undo when training ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from tunesmith.config import Recipe
from tunesmith.data.prepared import PreparedData
from tunesmith.forgetting.safeguards import Safeguards
from tunesmith.methods import Method
from tunesmith.runtime import Runtime
from tunesmith.stages import Stage
from tunesmith.training.hooks import Hook, MetricsFile, ProgressBar
from tunesmith.training.loop import LoopSeams
from tunesmith.training.sampler import build_sampler
from tunesmith.training.speed import SpeedSetup, prepare_speed
from tunesmith.training.trackers import Trackers


@dataclass(frozen=True)
class Assembly:
    """The loop's seams and the speed levers behind them."""

    seams: LoopSeams
    speed: SpeedSetup
    trackers: Optional[Trackers] = None


def run_identity(recipe: Recipe) -> dict:
    """What identifies a run's starting point for caches (the EWC Fisher): model, method, seed."""
    return {"model": recipe.model.name, "method": recipe.method.model_dump(mode="json"), "seed": recipe.train.seed}


def build_safeguards(recipe: Recipe, runtime: Runtime, out: Path, say: Callable[..., None],
                     progress: bool) -> Safeguards:
    """The run's safeguards against forgetting, given the sections they read."""
    return Safeguards(recipe.regularise, recipe.retain, run_identity(recipe), recipe.eval.batch_size, runtime, out,
                      say, progress)


def assemble_loop(recipe: Recipe, stage: Stage, model, method: Method, tokenizer, data: PreparedData,
                  safeguards: Safeguards, runtime: Runtime, out: Path, say: Callable[..., None],
                  progress: bool = True, extra_hooks: Sequence[Hook] = ()) -> Assembly:
    """Build the loop's seams once (call after the method is applied, before a resume loads weights).

    Args:
        recipe: The run's recipe; each part below reads only its own section of it.
        stage: The run's stage (gives the objective).
        model: The model after ``method.apply``; speed levers prepare it in place.
        data: The prepared data (its sources and lengths decide the sampler).
        safeguards: The run's safeguards (give the penalties).
        extra_hooks: Hooks added to the default ones (main process only).
    """
    train = recipe.train
    speed = prepare_speed(model, method, train.speed, train, runtime.device)
    if data.sources:
        say("data mixture: " + ", ".join(f"{s.name} {s.weight:.3f} ({s.count} examples)" for s in data.sources))
    say(speed.describe())
    lengths = [len(example.input_ids) for example in data.train] if speed.group_by_length else None
    sampler = build_sampler(len(data.train), data.sources, train.batch_size, train.grad_accum, runtime.world_size,
                            runtime.rank, train.seed, lengths)
    penalties = tuple(safeguards.penalties(model, tokenizer, method))
    trackers = build_trackers(recipe, out) if runtime.is_main else None
    hooks = tuple(build_hooks(recipe, out, progress, extra_hooks, trackers)) if runtime.is_main else ()
    return Assembly(LoopSeams(stage.objective(speed), sampler, penalties, hooks), speed, trackers)


def build_trackers(recipe: Recipe, out: Path) -> Optional[Trackers]:
    """The experiment trackers the output section names (None when it names none)."""
    names = recipe.output.tracker_names
    return Trackers(names, out, recipe.model_dump(mode="json"), recipe.output.tracking) if names else None


def build_hooks(recipe: Recipe, out: Path, progress: bool, extra_hooks: Sequence[Hook],
                trackers: Optional[Trackers] = None) -> list[Hook]:
    """The main process's hooks: metrics file, progress bar, experiment trackers, and the caller's own."""
    hooks: list[Hook] = [MetricsFile(out / "metrics.jsonl"), *extra_hooks]
    hooks += [ProgressBar()] if progress else []
    hooks += [trackers] if trackers is not None else []
    return hooks
