"""``finetune(recipe)``: the whole run as a list of steps."""

from __future__ import annotations

import contextlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from tunesmith.config import ModelSection, Recipe, recipe_to_yaml
from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_folder, write_text_atomic
from tunesmith.core.reporter import Reporter
from tunesmith.core.run_files import RunLayout, RunSummary
from tunesmith.core.runtime import Runtime, init_runtime, peak_memory_mb, shutdown_runtime
from tunesmith.evaluation import run_generation_task
from tunesmith.evaluation.before_after import report_after_training
from tunesmith.export.model_card import run_card_facts, write_card
from tunesmith.inference.generate import base_shape
from tunesmith.methods import build_method, count_parameters
from tunesmith.methods.base import trainable_in_float32
from tunesmith.models import load_model_and_tokenizer
from tunesmith.pipeline.assembly import (
    Assembly,
    RunContext,
    RunParts,
    assemble_loop,
    build_safeguards,
    describe_assembly,
)
from tunesmith.pipeline.provenance import record_provenance
from tunesmith.stages import build_stage
from tunesmith.training.checkpoint import latest_checkpoint
from tunesmith.training.fingerprint import run_fingerprint
from tunesmith.training.hooks import Hook
from tunesmith.training.loop import Trainer, TrainResult
from tunesmith.training.run_folder import RunFolder, open_run_folder
from tunesmith.training.sharding import check_sharded_recipe
from tunesmith.training.speed import apply_speed, autocast_choice, planned_workload
from tunesmith.training.trackers import Trackers


class Interrupted(TunesmithError):
    """Training was stopped with Ctrl-C; the message says how to resume."""


def finetune(recipe: Recipe, resume: bool = False, extra_hooks: Sequence[Hook] = (),
             recipe_path: str = "RECIPE", progress: bool = True, allow_changes: bool = False) -> RunSummary:
    """Load the model, prepare data, apply the method, train, evaluate and save.

    Every step that changes the model is a line here, in order: dropout, the stage's head, the method,
    the speed levers, the EWC Fisher (forward and backward passes), NEFTune's noise hooks.

    Args:
        recipe: The validated recipe.
        resume: Continue from the newest checkpoint in the output folder.
        extra_hooks: Hooks added to the default ones (main process only).
        recipe_path: How to name the recipe in messages (the resume command).
        progress: Show a progress bar.
        allow_changes: Resume although the recipe or data changed since the checkpoint (``--allow-changes``).

    Returns:
        The run's summary, also written to ``summary.json``.
    """
    check_sharded_recipe(recipe)
    with run_session(recipe, resume, allow_changes) as (runtime, folder):
        context = RunContext(recipe, runtime, RunLayout(folder.out), Reporter(runtime.is_main, progress), recipe_path,
                             tuple(extra_hooks))
        say = context.reporter.say
        torch.manual_seed(recipe.train.seed)
        model_section = load_section(recipe, runtime.device)  # bfloat16 when the frozen base will be held in it
        model, tokenizer = load_model_and_tokenizer(model_section, runtime.cache, runtime.device)
        stage = build_stage(recipe.stage)
        stage.check_model(model)  # e.g. an encoder is refused by every stage but cls
        data = stage.encode_data(recipe.data, tokenizer, recipe.train.seed, runtime.cache)
        for split, stats in data.stats.items():
            say(stats.describe(split))
        task_before = evaluate_task(context, model, tokenizer, "before training", reuse_saved=True)
        safeguards = build_safeguards(context)
        safeguards.set_dropout(model)
        safeguards.measure_before(model, tokenizer, data)
        method = build_method(recipe.method)
        model = method.apply(stage.adapt_model(model))
        stage.after_method(model)  # e.g. a reward head trains; DPO keeps its reference
        if model_section is not recipe.model:
            trainable_in_float32(model)  # loaded in bfloat16: what trains stays float32 for the optimizer
        for note in stage.notes():
            say(note)
        parameters = count_parameters(model)  # before gradual unfreezing adds any
        say(describe_parameters(method, parameters))
        speed = apply_speed(model, method, recipe.train.speed, recipe.train, runtime.device,
                            planned_workload(recipe, data, parameters, runtime.world_size))  # compile: auto by it
        describe_assembly(context, data, speed)
        penalties = safeguards.compute_anchor_penalties(model, tokenizer)  # EWC's Fisher: passes over its data
        safeguards.add_neftune_noise(model)
        loop = assemble_loop(context, RunParts(stage, method, model, tokenizer, data), speed, penalties)
        trainer = Trainer(model, method, data, recipe.train, recipe.eval, runtime, tokenizer.pad_token_id, loop.seams,
                          checkpoint_dir=context.layout.checkpoints)
        if method.summary():
            say(method.summary())
        if resume:
            resume_training(trainer, folder.resume_from, say)
        if runtime.is_main:
            write_text_atomic(context.layout.config, recipe_to_yaml(recipe))  # only now: the run really starts
            record_provenance(recipe, context.layout.root, torch.get_num_threads(), runtime.world_size,
                              str(runtime.device))
        trainer.state.fingerprint = folder.fingerprint  # saved with each checkpoint; --resume compares it
        result = run_training(context, trainer, loop)
        safeguards.remove_noise()
        forgetting = safeguards.measure_after(model, tokenizer, data)
        gathered = trainer.saveable_state()  # FSDP: the shards joined into one state dict (a collective)
        if runtime.is_main:
            save_result(method, model, tokenizer, folder.out, recipe, data.template, gathered, stage)
        task_after = evaluate_task(context, model, tokenizer, "after training")
        summary = summarise(context, result, method, data, parameters)
        return finish(context, replace(summary, forgetting=forgetting or None, task=task_change(task_before, task_after)),
                      loop.trackers)


def load_section(recipe: Recipe, device: torch.device) -> ModelSection:
    """``recipe.model``, loading in bfloat16 when the run would hold its frozen base in bfloat16 anyway.

    Under bfloat16 autocast a frozen-base method (LoRA, DoRA, IA3) stores its frozen base in
    bfloat16 (``PeftMethod.cast_for_autocast``); loaded in float32 first, the whole model would sit in
    memory in float32 before the cast. Loaded in bfloat16, transformers casts each tensor as it streams in.
    Only the default ``model.dtype: float32`` is replaced, and not under FSDP or a quantised base.
    """
    dtype = autocast_choice(recipe.train.speed, device)[0]
    if (dtype is None or recipe.model.dtype != "float32" or recipe.model.quantize != "none"
            or recipe.train.distributed == "fsdp"
            or not getattr(build_method(recipe.method), "frozen_base_in_autocast_dtype", False)):
        return recipe.model
    return recipe.model.model_copy(update={"dtype": str(dtype).removeprefix("torch.")})


@contextlib.contextmanager
def run_session(recipe: Recipe, resume: bool, allow_changes: bool = False) -> Iterator[tuple[Runtime, RunFolder]]:
    """The run's runtime and output folder; the folder is marked finished or failed, the runtime always shut down.

    On any failure (a ``TunesmithError``, Ctrl-C, a crash) the main process marks the folder failed: it
    is kept if it holds a checkpoint, else removed and what ``--overwrite`` set aside put back
    (:mod:`training.run_folder`).
    """
    runtime = init_runtime(recipe.train.device)
    folder = None
    try:
        folder = claim_output_dir(Path(recipe.output.dir), resume, recipe.output.overwrite, recipe.train.max_steps,
                                    runtime, run_fingerprint(recipe, runtime.world_size), allow_changes)
        yield runtime, folder
        if runtime.is_main:
            folder.finished()
    except BaseException:
        if folder is not None and runtime.is_main:
            folder.failed()
        raise
    finally:
        if folder is not None:
            folder.release()
        shutdown_runtime(runtime)


def resume_training(trainer: Trainer, checkpoint: Path, say) -> None:
    """Load ``checkpoint`` into ``trainer`` and say where the run continues."""
    trainer.resume(checkpoint)
    say(f"resuming from {checkpoint} (step {trainer.state.step} of {trainer.total_steps})")


def run_training(context: RunContext, trainer: Trainer, loop: Assembly) -> TrainResult:
    """``trainer.fit()``; Ctrl-C or SIGTERM becomes :class:`Interrupted` with the resume command.

    The speed levers are undone either way (e.g. transformers' own attention again), before anything is saved.
    """
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(context.layout, context.recipe_path)) from None
    finally:
        loop.speed.undo()


def describe_parameters(method, parameters: tuple[int, int]) -> str:
    trainable, total = parameters
    return f"method {method.kind}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"


def task_change(task_before: Optional[dict], task_after: Optional[dict]) -> Optional[dict]:
    """The summary's ``task`` block (metric, before, after), when the task was scored both times."""
    if task_before is None or task_after is None:
        return None
    return {"metric": task_after["metric"], "before": task_before["score"], "after": task_after["score"]}


def finish(context: RunContext, summary: RunSummary, trackers: Optional[Trackers] = None) -> RunSummary:
    """Say the task's change, add the before/after report, write ``summary.json`` and the result's model card
    (main process), then send the summary and the result to the experiment trackers."""
    recipe, layout, say = context.recipe, context.layout, context.reporter.say
    if summary.task is not None:
        task = summary.task
        say(f"{task['metric']} on {recipe.eval.task.file}: before {task['before']:.3f} -> after {task['after']:.3f}")
    if recipe.eval.report is not None and context.runtime.is_main:
        summary = replace(summary, report=report_after_training(recipe, layout.root, str(context.runtime.device)))
    if trackers is not None:
        summary = replace(summary, trackers=trackers.locations())
    if context.runtime.is_main:
        write_text_atomic(layout.summary, summary.to_json())
        write_card(Path(summary.artifact), run_card_facts(layout.root))
        say(f"saved {Path(summary.artifact).name} to {summary.artifact}; summary in {layout.summary}")
    if trackers is not None:
        trackers.close(summary.to_dict(), Path(summary.artifact))
    return summary


def summarise(context: RunContext, result: TrainResult, method, data, parameters: tuple[int, int]) -> RunSummary:
    """The run's headline numbers, as written to ``summary.json``."""
    trainable, total = parameters
    runtime = context.runtime
    return RunSummary(
        steps=result.state.step,
        total_steps=result.total_steps,
        stopped_early=result.state.stopped_early,
        tokens=result.state.tokens,
        wall_time_s=round(result.wall_time, 3),
        tokens_per_s=round(result.state.tokens / max(result.wall_time, 1e-9), 1),
        peak_memory_mb=round(peak_memory_mb(runtime.device), 1),
        train_loss=result.train_loss,
        val_loss=result.validation.get("loss"),
        val_perplexity=result.validation.get("perplexity"),
        trainable_parameters=trainable,
        total_parameters=total,
        method=method.kind,
        artifact=str(context.layout.result(method.artifact)),
        template=data.template,
        world_size=runtime.world_size,
        data={split: vars(stats) for split, stats in data.stats.items()},
        validation=result.validation,
    )


def claim_output_dir(out: Path, resume: bool, overwrite: bool, max_steps: Optional[int], runtime: Runtime,
                       fingerprint: Optional[dict] = None, allow_changes: bool = False) -> RunFolder:
    """Check (and on the main process, create or set aside) the output folder; see :mod:`training.run_folder`.

    The other processes look only after the main process has moved or created it.
    """
    if runtime.distributed and not runtime.is_main:
        torch.distributed.barrier()
    folder = open_run_folder(out, resume, overwrite, max_steps, runtime.is_main, fingerprint=fingerprint,
                             allow_changes=allow_changes)
    if runtime.distributed and runtime.is_main:
        torch.distributed.barrier()
    return folder


def evaluate_task(context: RunContext, model, tokenizer, when: str, reuse_saved: bool = False) -> Optional[dict]:
    """Score the recipe's task (main process only); the before-training score is kept for resumes."""
    recipe, say = context.recipe, context.reporter.say
    if recipe.eval.task is None or not context.runtime.is_main:
        return None
    cache = context.layout.task_before if reuse_saved else context.layout.task_after
    if reuse_saved and cache.exists():
        return json.loads(cache.read_text())
    say(f"evaluating {recipe.eval.task.metric} on {recipe.eval.task.file} {when} ...")
    result = run_generation_task(model, tokenizer, recipe.eval.task, recipe.data.system_prompt, recipe.data.columns)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    sample = result["samples"][0]
    say(f"{result['metric']} {when}: {result['score']:.3f} on {result['count']} examples "
        f"(e.g. {sample['prompt']!r} -> {sample['prediction']!r}, expected {sample['reference']!r})")
    return result


def save_result(method, model, tokenizer, out: Path, recipe: Recipe, template: str,
                state_dict: Optional[dict] = None, stage=None) -> Path:
    """Write the result folder atomically: method artifact, what the stage adds (a head), tokenizer, manifest.

    ``state_dict``: the model's state gathered from its shards (FSDP), saved instead of its parameters.
    """
    final = out / method.artifact
    with atomic_folder(final) as partial:
        method.save(model, partial, state_dict=state_dict)
        if stage is not None:
            stage.save(model, partial)
        tokenizer.save_pretrained(partial)
        local = Path(recipe.model.name).expanduser()
        base_model = str(local.resolve()) if local.is_dir() else recipe.model.name  # a folder: valid from any cwd
        method.write_manifest(partial, base_model=base_model, template=template, base_config=base_shape(model),
                              stage=recipe.stage.kind, data_max_length=recipe.data.max_length,
                              **quantized_base_entry(recipe.model),
                              **(stage.manifest_entries() if stage is not None else {}))
    return final


def quantized_base_entry(section) -> dict:
    """The manifest's ``quantized_base`` for a run over a quantised base (how to rebuild what it trained against)."""
    return {} if section.quantize == "none" else {"quantized_base": {"quantize": section.quantize, "dtype": section.dtype}}


def interrupted_message(layout: RunLayout, recipe_path: str) -> str:
    try:
        checkpoint = latest_checkpoint(layout.checkpoints)
    except TunesmithError:
        return f"training interrupted before the first checkpoint; nothing to resume in {layout.root}"
    return (f"training interrupted; the last complete checkpoint is {checkpoint}. "
            f"Continue with: tunesmith train {recipe_path} --resume")
