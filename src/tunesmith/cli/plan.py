"""``tunesmith plan RECIPE [--methods recipe|all] [--json]``: memory, time, data and a recommendation, before training.

``tunesmith plan --shape NAME|FOLDER [--tokens N] [--r R]``: from a model's shape alone, before anything loads.
"""

from __future__ import annotations

import argparse
import json


def register(commands) -> None:
    plan = commands.add_parser("plan", help="Estimate memory and time per method, judge the data, and recommend.")
    plan.add_argument("recipe", nargs="?", help="YAML recipe file (not with --shape).")
    plan.add_argument("overrides", nargs="*", help="Dotted overrides such as train.batch_size=4.")
    plan.add_argument("--methods", default="recipe", choices=["recipe", "all"],
                      help="The recipe's method only, or every method.")
    plan.add_argument("--no-calibration", action="store_true", help="Skip the few timed steps (no time estimate).")
    plan.add_argument("--json", action="store_true", help="Print the plan as JSON.")
    plan.add_argument("--shape", help="Plan a model's shape before anything loads: a built-in shape (smollm2-1.7b, "
                      "qwen2.5-3b, llama-3.1-8b) or a model folder / config.json; no recipe.")
    plan.add_argument("--tokens", type=int, default=512, help="With --shape: tokens of one micro-batch.")
    plan.add_argument("--r", type=int, default=16, help="With --shape: the LoRA/QLoRA rank.")
    plan.set_defaults(handler=cmd_plan)


def cmd_plan(args: argparse.Namespace) -> int:
    import sys

    from tunesmith.config import load_recipe
    from tunesmith.workflows.plan import describe, plan_recipe

    if args.shape:
        return plan_a_shape(args)
    if args.recipe is None:
        from tunesmith.core.errors import TunesmithError

        raise TunesmithError("tunesmith plan needs a recipe file, or --shape NAME to plan a model's shape")
    recipe = load_recipe(args.recipe, list(args.overrides))
    if args.methods == "recipe" and recipe.model.quantize == "none":
        from tunesmith.core.runtime import keep_bitsandbytes_out

        keep_bitsandbytes_out()  # the calibration steps quantise nothing: peft would import it for seconds
    say = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    plan = plan_recipe(recipe, args.methods, calibrate=not args.no_calibration, say=say)
    print(json.dumps(plan.as_dict(), indent=2) if args.json else describe(plan))
    return 0


def plan_a_shape(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from tunesmith.core.errors import TunesmithError
    from tunesmith.core.runtime import available_memory_bytes
    from tunesmith.models.shapes import shape_config
    from tunesmith.workflows.plan.shapes import describe_shape, plan_shape

    if args.recipe is not None:
        raise TunesmithError(f"tunesmith plan --shape takes no recipe (got {args.recipe}); drop one of them")
    available = available_memory_bytes(torch.device("cpu"))  # before anything is built
    plan = plan_shape(shape_config(args.shape), args.shape, args.tokens, args.r, available)
    if args.json:
        document = dataclasses.asdict(plan)
        document["choices"] = {t: (c.label if (c := plan.choice(t)) else None) for t in plan.targets}
        print(json.dumps(document, indent=2))
    else:
        print(describe_shape(plan))
    return 0
