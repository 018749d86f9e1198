"""``tunesmith reproduce RUN [--out DIR]``: run a finished run again from its folder and compare."""

from __future__ import annotations

import argparse


def register(commands) -> None:
    reproduce = commands.add_parser(
        "reproduce", help="Train a finished run again from its folder alone; report whether the result is "
                          "bit-identical, or how far it is, with the loss curves side by side.")
    reproduce.add_argument("run", help="The output folder of a finished run.")
    reproduce.add_argument("--out", help="Folder of the new run (default: RUN-reproduced); must not exist.")
    reproduce.add_argument("--no-progress", action="store_true", help="No progress bar.")
    reproduce.set_defaults(handler=cmd_reproduce)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from tunesmith.workflows.reproduce import REPORT_FILE, reproduce

    result = reproduce(args.run, args.out, progress=not args.no_progress)
    print(result.describe())
    print(f"report in {result.reproduced}/{REPORT_FILE}")
    return 0
