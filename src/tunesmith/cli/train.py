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
    from tunesmith.pipeline.finetune import finetune

    if args.allow_changes and not args.resume:
        raise TunesmithError("--allow-changes only applies to --resume; drop it or add --resume")
    overrides = list(args.overrides) + (["output.overwrite=true"] if args.overwrite else [])
    recipe = load_recipe(args.recipe, overrides)
    check_inputs(recipe)  # what `tunesmith config check` resolves: a bad recipe fails before the model loads
    recipe = plan_check(recipe, skip=args.no_plan_check)
    # The resume command printed on interruption must name the same run: keep the overrides (output.dir=...).
    command = " ".join(shlex.quote(part) for part in [args.recipe, *args.overrides])
    finetune(recipe, resume=args.resume, recipe_path=command, progress=not args.no_progress,
             allow_changes=args.allow_changes)
    return 0


def plan_check(recipe, skip: bool):
    """The recipe, refused before loading when the plan says it cannot fit (plan/check.py), ``auto`` resolved."""
    from tunesmith.core.runtime import available_memory_bytes, cache_dir, launched_as_one_of_several, pick_device
    from tunesmith.models import resolve_model_path
    from tunesmith.workflows.plan.check import check_fits

    if launched_as_one_of_several():
        # The check plans one process on the whole machine's free memory, and under torchrun it left one rank of
        # two hung at exit in about one run of four (measured; never with --no-plan-check): single process only.
        return recipe
    device = pick_device(recipe.train.device, 0)
    return check_fits(recipe, resolve_model_path(recipe.model.name, cache_dir()), available_memory_bytes(device),
                      device.type == "cuda", refuse=not skip)
