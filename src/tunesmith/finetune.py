"""``finetune(recipe)``: the whole run as a list of steps."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from tunesmith.assembly import Assembly, assemble_loop, build_safeguards
from tunesmith.config import Recipe, recipe_to_yaml
from tunesmith.errors import TunesmithError
from tunesmith.evaluation import run_generation_task
from tunesmith.evaluation.compare import report_after_training
from tunesmith.files import atomic_folder, write_text_atomic
from tunesmith.inference import base_shape
from tunesmith.methods import build_method, count_parameters
from tunesmith.models import load_model_and_tokenizer
from tunesmith.runtime import Runtime, init_runtime, peak_memory_mb, shutdown_runtime
from tunesmith.stages import build_stage
from tunesmith.training.checkpoint import latest_checkpoint
from tunesmith.training.fingerprint import run_fingerprint
from tunesmith.training.run_folder import RunFolder, open_run_folder
from tunesmith.training.hooks import Hook
from tunesmith.training.loop import Trainer, TrainResult
from tunesmith.training.sharding import check_sharded_recipe

logger = logging.getLogger(__name__)


class Interrupted(TunesmithError):
    """Training was stopped with Ctrl-C; the message says how to resume."""


def finetune(recipe: Recipe, resume: bool = False, extra_hooks: Sequence[Hook] = (),
             recipe_path: str = "RECIPE", progress: bool = True, allow_changes: bool = False) -> dict:
    """Load the model, prepare data, apply the method, train, evaluate and save.

    Args:
        recipe: The validated recipe.
        resume: Continue from the newest checkpoint in the output folder.
        extra_hooks: Hooks added to the default ones (main process only).
        recipe_path: How to name the recipe in messages (the resume command).
        progress: Show a progress bar.
        allow_changes: Resume although the recipe or data changed since the checkpoint (``--allow-changes``).

    Returns:
        The summary also written to ``summary.json``.
    """
    check_sharded_recipe(recipe)
    with run_session(recipe, resume, allow_changes) as (runtime, folder):
        out = folder.out
        torch.manual_seed(recipe.train.seed)
        say = print if runtime.is_main else (lambda *args, **kwargs: None)
        model, tokenizer = load_model_and_tokenizer(recipe.model, runtime.cache, runtime.device)
        stage = build_stage(recipe.stage)
        stage.check_model(model)  # e.g. an encoder is refused by every stage but cls
        data = stage.prepare_data(recipe.data, tokenizer, recipe.train.seed, runtime.cache)
        for split, stats in data.stats.items():
            say(stats.describe(split))
        task_before = evaluate_task(model, tokenizer, recipe, runtime, out / "task_before.json", "before training",
                                    reuse_saved=True)
        safeguards = build_safeguards(recipe, runtime, out, say, progress)
        safeguards.before_method(model, tokenizer, data)
        method = build_method(recipe.method)
        model = method.apply(stage.prepare_model(model))
        stage.after_method(model)  # e.g. a reward head trains; DPO keeps its reference
        for note in stage.notes():
            say(note)
        parameters = count_parameters(model)  # before gradual unfreezing adds any
        say(describe_parameters(method, parameters))
        loop = assemble_loop(recipe, stage, model, method, tokenizer, data, safeguards, runtime, out, say, progress,
                             extra_hooks)
        trainer = Trainer(model, method, data, recipe.train, recipe.eval, runtime, tokenizer.pad_token_id, loop.seams,
                          checkpoint_dir=out / "checkpoints")
        if method.summary():
            say(method.summary())
        if resume:
            resume_training(trainer, folder.resume_from, say)
        if runtime.is_main:
            write_text_atomic(out / "config.yaml", recipe_to_yaml(recipe))  # only now: the run really starts
        trainer.state.fingerprint = folder.fingerprint  # saved with each checkpoint; --resume compares it
        result = run_training(trainer, loop, out, recipe_path)
        forgetting = safeguards.after_training(model, tokenizer, data)
        gathered = trainer.saveable_state()  # FSDP: the shards joined into one state dict (a collective)
        if runtime.is_main:
            save_result(method, model, tokenizer, out, recipe, data.template, gathered, stage)
        task_after = evaluate_task(model, tokenizer, recipe, runtime, out / "task_after.json", "after training")
        return finish(recipe, result, method, data, runtime, out, parameters, forgetting, task_before, task_after, say)


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
        folder = prepare_output_dir(Path(recipe.output.dir), resume, recipe.output.overwrite, recipe.train.max_steps,
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


def run_training(trainer: Trainer, loop: Assembly, out: Path, recipe_path: str) -> TrainResult:
    """``trainer.fit()``; Ctrl-C or SIGTERM becomes :class:`Interrupted` with the resume command.

    The speed levers are undone either way (e.g. transformers' own attention again), before anything is saved.
    """
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        raise Interrupted(interrupted_message(out, recipe_path)) from None
    finally:
        loop.speed.undo()


def describe_parameters(method, parameters: tuple[int, int]) -> str:
    trainable, total = parameters
    return f"method {method.kind}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f}%)"


def finish(recipe: Recipe, result, method, data, runtime: Runtime, out: Path, parameters: tuple[int, int],
           forgetting: dict, task_before: Optional[dict], task_after: Optional[dict], say) -> dict:
    """The summary: headline numbers, forgetting, task before/after, the report; written by the main process."""
    summary = summarise(result, method, data, runtime, out, parameters)
    if forgetting:
        summary["forgetting"] = forgetting
    if task_before is not None and task_after is not None:
        summary["task"] = {"metric": task_after["metric"], "before": task_before["score"], "after": task_after["score"]}
        say(f"{task_after['metric']} on {recipe.eval.task.file}: before {task_before['score']:.3f} -> after "
            f"{task_after['score']:.3f}")
    if recipe.eval.report is not None and runtime.is_main:
        summary["report"] = report_after_training(recipe, out, str(runtime.device))
    if runtime.is_main:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        say(f"saved {method.artifact} to {out / method.artifact}; summary in {out / 'summary.json'}")
    return summary


def summarise(result, method, data, runtime: Runtime, out: Path, parameters: tuple[int, int]) -> dict:
    """The run's headline numbers, as written to ``summary.json``."""
    trainable, total = parameters
    return {
        "steps": result.state.step,
        "total_steps": result.total_steps,
        "stopped_early": result.state.stopped_early,
        "tokens": result.state.tokens,
        "wall_time_s": round(result.wall_time, 3),
        "tokens_per_s": round(result.state.tokens / max(result.wall_time, 1e-9), 1),
        "peak_memory_mb": round(peak_memory_mb(runtime.device), 1),
        "train_loss": result.train_loss,
        "val_loss": result.validation.get("loss"),
        "val_perplexity": result.validation.get("perplexity"),
        "trainable_parameters": trainable,
        "total_parameters": total,
        "method": method.kind,
        "artifact": str(out / method.artifact),
        "template": data.template,
        "world_size": runtime.world_size,
        "data": {split: vars(stats) for split, stats in data.stats.items()},
        "validation": result.validation,
    }


def prepare_output_dir(out: Path, resume: bool, overwrite: bool, max_steps: Optional[int], runtime: Runtime,
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


def evaluate_task(model, tokenizer, recipe: Recipe, runtime: Runtime, cache: Path, when: str,
                  reuse_saved: bool = False) -> Optional[dict]:
    """Score the recipe's task (main process only); the before-training score is kept for resumes."""
    if recipe.eval.task is None or not runtime.is_main:
        return None
    if reuse_saved and cache.exists():
        return json.loads(cache.read_text())
    print(f"evaluating {recipe.eval.task.metric} on {recipe.eval.task.file} {when} ...", flush=True)
    result = run_generation_task(model, tokenizer, recipe.eval.task, recipe.data.system_prompt)
    cache.write_text(json.dumps(result, indent=2) + "\n")
    sample = result["samples"][0]
    print(f"{result['metric']} {when}: {result['score']:.3f} on {result['count']} examples "
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
                              **(stage.manifest_entries() if stage is not None else {}))
    return final


def interrupted_message(out: Path, recipe_path: str) -> str:
    try:
        checkpoint = latest_checkpoint(out / "checkpoints")
    except TunesmithError:
        return f"training interrupted before the first checkpoint; nothing to resume in {out}"
    return (f"training interrupted; the last complete checkpoint is {checkpoint}. "
            f"Continue with: tunesmith train {recipe_path} --resume")
