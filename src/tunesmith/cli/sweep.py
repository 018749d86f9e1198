"""``tunesmith sweep RECIPE --space space.yaml [--trials N]``: hyper-parameter search through Optuna."""

from __future__ import annotations

import argparse

from tunesmith.cli.common import at_least


def register(commands) -> None:
    sweep = commands.add_parser("sweep", help="Search hyper-parameters with Optuna; each trial is a normal run.")
    sweep.add_argument("recipe", help="YAML recipe file (the defaults of every trial).")
    sweep.add_argument("--space", required=True, help="YAML file: dotted recipe field -> range or choices.")
    sweep.add_argument("--trials", type=at_least(1), default=8, help="Trials to run in all (a resumed study counts the done).")
    sweep.add_argument("--out", help="Study folder (default: the recipe's output.dir + '-sweep').")
    sweep.add_argument("--objective", default="val_loss",
                       help="val_loss (default, minimised) or task (the recipe's eval.task metric, maximised).")
    sweep.add_argument("--no-pruning", action="store_true", help="Run every trial to the end.")
    sweep.add_argument("--storage", help="Optuna storage URL the workers share: postgresql://USER@HOST:PORT/DB for "
                                         "several machines (run the same command on each), or sqlite:///FILE "
                                         "(default: sqlite:///OUT/study.db).")
    sweep.add_argument("--workers", type=at_least(1), default=1, help="Worker processes on this machine (default 1).")
    sweep.add_argument("--heartbeat", type=at_least(1), default=30,
                       help="Seconds between a worker's heartbeats; a killed worker's trial is run again after three.")
    sweep.set_defaults(handler=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    from tunesmith.workflows.sweep import run_sweep

    study = run_sweep(args.recipe, args.space, args.trials, args.out, args.objective, pruning=not args.no_pruning,
                      storage=args.storage, workers=args.workers, heartbeat=args.heartbeat)
    print(study.describe())
    return 0
