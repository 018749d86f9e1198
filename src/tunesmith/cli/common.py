"""Arguments shared by the commands that load a model, and checked flag types."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def status(message: str) -> None:
    """A progress line on standard error, flushed: a long command says what it is doing before it does it
    (standard output stays the command's result, e.g. eval's JSON or generate's reply)."""
    print(message, file=sys.stderr, flush=True)


def counting(work: Callable[[Sequence], list[T]], what: str, total: int | None = None,
             chunk: int | None = None) -> Callable[[Sequence], list[T]]:
    """``work`` (a batch in, a list out: a model generating or rewriting) saying after each batch how many
    items it has done, so a long generation is never silent; ``chunk`` cuts a larger batch into calls of
    that size (the same results: ``work`` treats its items independently)."""
    done = 0

    def counted(batch: Sequence) -> list[T]:
        nonlocal done
        results: list[T] = []
        size = chunk or max(1, len(batch))
        for start in range(0, len(batch), size):
            part = batch[start:start + size]
            results += work(part)
            done += len(part)
            status(f"{what}: {done}{f'/{total}' if total else ''} done")
        return results

    return counted


def at_least(minimum: float, kind: type = int) -> Callable[[str], float]:
    """An argparse type: a number of ``kind`` no smaller than ``minimum`` (``--batch-size 0`` is refused)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") \
                from None
        if not value >= minimum:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {text})")
        if kind is float and value == float("inf"):
            raise argparse.ArgumentTypeError(f"must be finite (got {text})")
        return value

    parse.__name__ = f"{kind.__name__} >= {minimum}"
    return parse


def between(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number from ``low`` to ``high`` (``--threshold 1.5`` is refused)."""

    def parse(text: str) -> float:
        value = at_least(low, float)(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high} (got {text})")
        return value

    parse.__name__ = f"number in [{low}, {high}]"
    return parse


def device(text: str) -> str:
    """An argparse type: a device this machine has (``--device cuda`` without a GPU is refused here)."""
    from tunesmith.core.errors import TunesmithError
    from tunesmith.core.runtime import check_device

    try:
        check_device(text, "device")
    except TunesmithError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m-instruct", help="Alias, hub id or folder.")
    parser.add_argument("--adapter", help="A trained adapter folder (a run's adapter/).")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"])
    parser.add_argument("--device", default="cpu", type=device, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--trust-remote-code", action="store_true")


def load_model_from_args(args: argparse.Namespace, only_model: bool = False):
    """(model, tokenizer) named by --model/--adapter/--dtype/--device.

    Args:
        only_model: The command loads no other model: unless this one is a QLoRA result, bitsandbytes is kept
            out of the process (:func:`tunesmith.core.runtime.keep_bitsandbytes_out`, seconds of its start).
    """
    status(f"loading {args.model}{f' with {args.adapter}' if args.adapter else ''} ...")
    from tunesmith.core.runtime import keep_bitsandbytes_out
    from tunesmith.inference.generate import load_for_inference
    from tunesmith.inference.results import quantises_base

    if only_model and not quantises_base(args.adapter or args.model):
        keep_bitsandbytes_out()

    return load_for_inference(args.model, args.adapter, args.dtype, args.device, args.trust_remote_code)


def check_generation_length(model, tokenizer, max_new_tokens: int) -> None:
    """Refuse a ``--max-new-tokens`` the model's context window cannot hold (it could never be reached).

    Raises:
        TunesmithError: Naming the flag, the window and the largest value that fits.
    """
    from tunesmith.core.errors import TunesmithError
    from tunesmith.evaluation.loglikelihood import max_model_length

    window = max_model_length(model, tokenizer)
    if max_new_tokens >= window:
        raise TunesmithError(f"--max-new-tokens {max_new_tokens} does not fit the model's context window of {window} "
                             f"tokens (the prompt needs room too); give at most {window - 1}")


def refuse_foreign_replacement(out: Path, written: frozenset[str], flag: str) -> None:
    """Refuse ``flag`` on a folder holding anything the command does not write itself (a user's files).

    Raises:
        TunesmithError: Naming the folder and the first foreign names.
    """
    from tunesmith.core.errors import TunesmithError

    if out.exists() and not out.is_dir():
        raise TunesmithError(f"{out} is a file, not a folder; {flag} replaces only a folder this command wrote")
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in written) if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise TunesmithError(f"{flag} would delete files this command did not write in {out} ({shown}); "
                             "move them out first or choose another --out")
