"""The ``tunesmith`` command line.

Each command lives in its own module under :mod:`tunesmith.cli` and exposes ``register(commands)``,
which adds its sub-parser and sets ``handler``; adding a command adds a module and one line to
``COMMAND_MODULES``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Sequence

from tunesmith.cli.common import status
from tunesmith.core.errors import TunesmithError
from tunesmith.core.runtime import configure_threads

COMMAND_MODULES = ("train", "plan", "sweep", "inference", "evaluate", "config", "models", "methods", "export", "data",
                   "compare", "serve", "cai", "scoring", "reproduce")
STARTS_SLOWLY = ("generate", "chat", "eval", "export", "cai", "score", "classify", "sweep", "serve", "reproduce")
"""Commands whose first work is importing torch and transformers (seconds; a minute on a busy machine): they say so."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; user errors print one sentence and exit with status 2.

    The thread policy is set first, before any command imports torch (OpenMP reads it when torch
    loads it), so training, evaluation, generation and serving all run with it.
    """
    threads = configure_threads()
    parser = build_parser()
    args = parse_arguments(parser, argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger(__name__).info(threads)
    if not args.verbose:
        # bitsandbytes warns on every import that its optimised CPU kernel could not be fetched from the hub,
        # advising trust_remote_code: offline that is noise, and not advice a user of this tool should follow
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if args.command in STARTS_SLOWLY:
        status(f"tunesmith {args.command}: loading torch and transformers ...")
    if args.command in ("train", "plan", "sweep", "generate", "chat", "eval", "methods", "export", "cai", "score", "reproduce",
                        "classify"):
        quiet_libraries()
    try:
        return args.handler(args) or 0
    except TunesmithError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, accepting dotted overrides also after flags (``train r.yaml --resume output.dir=x``)."""
    args, extra = parser.parse_known_args(argv)
    late = [item for item in extra if "=" in item and not item.startswith("-")]
    if extra and (late != extra or not isinstance(getattr(args, "overrides", None), list)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def build_parser() -> argparse.ArgumentParser:
    """The parser with every command registered."""
    parser = argparse.ArgumentParser(prog="tunesmith", description="Fine-tune a language model from one recipe file.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Log what each step does.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"tunesmith.cli.{name}").register(commands)
    return parser


def quiet_libraries() -> None:
    """Hide the libraries' own loading bars and deprecation chatter; our progress bar is enough."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()


if __name__ == "__main__":
    sys.exit(main())
