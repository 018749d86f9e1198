"""``tunesmith train RECIPE [key.path=value ...]``."""

from __future__ import annotations

import argparse
import shlex

from tunesmith.core.errors import TunesmithError


def register(commands) -> None:
    train = commands.add_parser("train", help="Fine-tune as a recipe says.")
    train.add_argument("recipe", help="YAML recipe file.")
    train.add_argument("overrides", nargs="*", help="Dotted overrides such as train.lr=1e-4.")
    train.add_argument("--resume", action="store_true", help="Continue from the newest checkpoint.")
    train.add_argument("--allow-changes", action="store_true",
                       help="With --resume: continue although the recipe or data changed since the checkpoint.")
    train.add_argument("--overwrite", action="store_true", help="Replace the output folder if it is a tunesmith run.")
    train.add_argument("--no-progress", action="store_true", help="No progress bar.")
    train.add_argument("--no-plan-check", action="store_true",
                       help="Train although the plan says the run does not fit the memory available (docs/plan.md).")
    train.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from tunesmith.cli.config import check_inputs
    from tunesmith.config import load_recipe
    from tunesmith.core.runtime import keep_bitsandbytes_out
    from tunesmith.pipeline.finetune import finetune

    if args.allow_changes and not args.resume:
        raise TunesmithError("--allow-changes only applies to --resume; drop it or add --resume")
    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    recipe = load_recipe(args.recipe, overrides)
    check_inputs(recipe)  # what `tunesmith config check` resolves: a bad recipe fails before the model loads
    if recipe.model.quantize == "none" and recipe.eval.report is None:  # (a report's suite may load a QLoRA result)
        keep_bitsandbytes_out()  # peft would import it for nothing: seconds of the start (core/runtime.py)
    recipe = plan_check(recipe, skip=args.no_plan_check)
    # The resume command printed on interruption must name the same run: keep the overrides (output.dir=...).
    command = " ".join(shlex.quote(part) for part in [args.recipe, *args.overrides])
    finetune(recipe, resume=args.resume, recipe_path=command, progress=not args.no_progress,
             allow_changes=args.allow_changes)
    return 0


def plan_check(recipe, skip: bool):
    """The recipe, refused before loading when the plan says it cannot fit (plan/check.py), ``auto`` resolved.

    Under torchrun every process joins the group first and the main process decides for all, on the least
    memory any process has (its share of the machine's: :func:`memory_for_each_process`): every process then
    trains the same recipe (``auto`` resolved alike) or every process refuses with the same sentence.
    """
    from tunesmith.core.runtime import (
        cache_dir,
        from_main_process,
        init_runtime,
        memory_for_each_process,
        shutdown_runtime,
    )
    from tunesmith.models import resolve_model_path
    from tunesmith.workflows.plan.check import check_fits

    runtime = init_runtime(recipe.train.device)  # finetune's run_session finds the group joined and keeps it
    available = memory_for_each_process(runtime)
    decision = None
    if runtime.is_main:
        try:
            decision = check_fits(recipe, resolve_model_path(recipe.model.name, cache_dir()), available,
                                  runtime.device.type == "cuda", refuse=not skip)
        except TunesmithError as refusal:
            decision = str(refusal)
    decision = from_main_process(runtime, decision)
    if isinstance(decision, str):
        shutdown_runtime(runtime)
        raise TunesmithError(decision)
    return decision
