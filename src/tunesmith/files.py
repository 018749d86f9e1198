"""Writing results whole or not at all: a folder or file appears under its name only once complete.

Everything tunesmith writes that a later step or a user reads (the result folder, exports, reports,
caches) goes through these two helpers, so an interrupted write never leaves a half-written result
under the real name, and what was there before stays until the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_folder(final: Path) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; on success it replaces ``final``, on error it is removed.

    The old ``final`` (if any) is moved aside and removed only after the new one is in place.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``final`` to write; on success it replaces ``final`` (``os.replace``)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    os.close(descriptor)
    try:
        yield Path(name)
        os.replace(name, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        raise


def write_text_atomic(final: Path, text: str) -> Path:
    """``final.write_text(text)`` (UTF-8), whole or not at all."""
    with atomic_path(final) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(final)
