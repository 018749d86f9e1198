"""One assembly of a run: its context, and the loop's seams built once from the parts that decide them.

:class:`RunContext` is built once per run: the recipe (each part reads only its own section), the
runtime, the run folder's :class:`~tunesmith.core.run_files.RunLayout` and the one
:class:`~tunesmith.core.reporter.Reporter`. :func:`assemble_loop` then builds the seams: the stage gives
the objective (using the speed levers), the data's sources and the speed options decide the sampler,
the penalties come ready-made, and the output section gives the hooks. Nothing here changes the model
or runs it: the steps that do (speed levers, the EWC Fisher, NEFTune) are lines of ``finetune()``.
The result is one frozen :class:`~tunesmith.training.loop.LoopSeams` that the
:class:`~tunesmith.training.loop.Trainer` requires, plus the :class:`~tunesmith.training.speed.SpeedSetup`
to undo when training ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from tunesmith.config import Recipe
from tunesmith.core.reporter import Reporter
from tunesmith.core.run_files import RunLayout
from tunesmith.core.runtime import Runtime
from tunesmith.data.encoded import EncodedData
from tunesmith.forgetting.safeguards import Safeguards
from tunesmith.methods import Method
from tunesmith.stages import Stage
from tunesmith.training.hooks import Hook, MetricsFile, ProgressBar
from tunesmith.training.loop import LoopSeams, Penalty
from tunesmith.training.sampler import build_sampler, repeat_steps
from tunesmith.training.speed import SpeedSetup
from tunesmith.training.trackers import Trackers


@dataclass(frozen=True)
class RunContext:
    """What every step of one run shares, built once by ``finetune()``.

    Attributes:
        recipe: The validated recipe; each part is handed its own section.
        runtime: Device, rank, world size, cache folder.
        layout: Every path of the run folder.
        reporter: The run's messages (main process only) and whether progress bars show.
        recipe_path: How messages name the recipe (the resume command).
        extra_hooks: Hooks added to the default ones (main process only), e.g. a sweep's pruning.
    """

    recipe: Recipe
    runtime: Runtime
    layout: RunLayout
    reporter: Reporter
    recipe_path: str = "RECIPE"
    extra_hooks: tuple[Hook, ...] = ()


@dataclass(frozen=True)
class RunParts:
    """The run's parts once the method is applied: what the loop's seams are built from.

    Attributes:
        stage: Gives the objective.
        method: The applied method.
        model: The model after ``method.apply`` and the speed levers.
        tokenizer: The model's tokenizer.
        data: The prepared data (its sources and lengths decide the sampler).
    """

    stage: Stage
    method: Method
    model: Any
    tokenizer: Any
    data: EncodedData


@dataclass(frozen=True)
class Assembly:
    """The loop's seams and the speed levers behind them."""

    seams: LoopSeams
    speed: SpeedSetup
    trackers: Optional[Trackers] = None


def run_identity(recipe: Recipe) -> dict:
    """What identifies a run's starting point for caches (the EWC Fisher): model, method, seed."""
    return {"model": recipe.model.name, "method": recipe.method.model_dump(mode="json"), "seed": recipe.train.seed}


def build_safeguards(context: RunContext) -> Safeguards:
    """The run's safeguards against forgetting, given the sections they read."""
    recipe = context.recipe
    return Safeguards(recipe.regularise, recipe.retain, run_identity(recipe), recipe.eval.batch_size, context.runtime,
                      context.layout, context.reporter)


def assemble_loop(context: RunContext, parts: RunParts, speed: SpeedSetup,
                  penalties: Sequence[Penalty] = ()) -> Assembly:
    """Build the loop's seams once (after the method and speed levers, before a resume loads weights).

    Args:
        context: The run's context; each seam reads only its own section of the recipe.
        parts: Stage, method, model, tokenizer and data of the run.
        speed: The speed levers :func:`~tunesmith.training.speed.apply_speed` applied.
        penalties: Terms added to each step's loss (EWC, L2-SP), already built.
    """
    train, runtime, data = context.recipe.train, context.runtime, parts.data
    objective = parts.stage.objective(speed)
    lengths = [len(example.input_ids) for example in data.train] if speed.group_by_length else None
    sampler = build_sampler(len(data.train), data.sources, train.batch_size, train.grad_accum, runtime.world_size,
                            runtime.rank, train.seed, lengths)
    sampler = repeat_steps(sampler, objective.updates_per_batch)  # online RL: several updates per rollout
    trackers = build_trackers(context) if runtime.is_main else None
    hooks = tuple(build_hooks(context, trackers)) if runtime.is_main else ()
    return Assembly(LoopSeams(objective, sampler, tuple(penalties), hooks), speed, trackers)


def describe_assembly(context: RunContext, data: EncodedData, speed: SpeedSetup) -> None:
    """Say what the data mixture and the speed levers are."""
    if data.sources:
        context.reporter.say("data mixture: " + ", ".join(f"{s.name} {s.weight:.3f} ({s.count} examples)"
                                                          for s in data.sources))
    context.reporter.say(speed.describe())


def build_trackers(context: RunContext) -> Optional[Trackers]:
    """The experiment trackers the output section names (None when it names none)."""
    output = context.recipe.output
    names = output.tracker_names
    return Trackers(names, context.layout.root, context.recipe.model_dump(mode="json"), output.tracking) if names else None


def build_hooks(context: RunContext, trackers: Optional[Trackers] = None) -> list[Hook]:
    """The main process's hooks: metrics file, progress bar, experiment trackers, and the caller's own."""
    layout = context.layout
    hooks: list[Hook] = [MetricsFile(layout.metrics), *context.extra_hooks]
    hooks += [ProgressBar()] if context.reporter.progress else []
    hooks += [trackers] if trackers is not None else []
    return hooks
