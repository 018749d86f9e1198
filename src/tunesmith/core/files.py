"""Writing results whole or not at all: a folder or file appears under its name only once complete.

Everything tunesmith writes that a later step or a user reads (the result folder, checkpoints,
exports, reports, caches, prepared data) goes through these helpers, so an interrupted write never
leaves a half-written result under the real name, and what was there before stays until the new
one is complete. ``durable=True`` also flushes what was written to disk before the rename and the
parent folder after it, so a power cut leaves the old version or the new one (checkpoints need this).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, data fingerprints, provenance)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk; a no-op where the platform cannot sync folders."""
    with contextlib.suppress(OSError):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def fsync_tree(folder: Path) -> None:
    """Flush every file under ``folder``, then every folder holding one (deepest first), then ``folder``."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for file in files:
        fsync_path(file)
    for parent in sorted({p.parent for p in files} | {folder}, key=lambda p: len(p.parts), reverse=True):
        fsync_path(parent)


def partial_folder_name(final: Path) -> Path:
    """``.NAME.partial`` beside ``final``: the fixed temporary name of :func:`fresh_partial_folder`."""
    final = Path(final)
    return final.with_name(f".{final.name}.partial")


def fresh_partial_folder(final: Path) -> Path:
    """The empty folder ``.NAME.partial`` beside ``final``, for writers that must agree on its name.

    Every process of a sharded checkpoint writes into it, and a later attempt at the same ``final``
    removes what an interrupted one left there; only one writer (or one group of processes) may use a
    given ``final`` at a time.
    """
    partial = partial_folder_name(final)
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    return partial


def swap_in_folder(partial: Path, final: Path, durable: bool = False, only_empty: bool = False) -> None:
    """Rename the complete folder ``partial`` to ``final``; an old ``final`` is moved aside first and removed after.

    Args:
        durable: Flush ``partial``'s files and folders before the rename and the parent folder after it.
        only_empty: ``final`` is never a result being replaced: an existing one must be an empty folder,
            removed with ``rmdir`` (which refuses anything else, so nothing a user put there is lost).
    """
    partial, final = Path(partial), Path(final)
    if durable:
        fsync_tree(partial)
    if only_empty and final.exists():
        final.rmdir()
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    if durable:
        fsync_path(final.parent)


@contextlib.contextmanager
def atomic_folder(final: Path, durable: bool = False, fixed_name: bool = False,
                  only_empty: bool = False) -> Iterator[Path]:
    """Yield a fresh sibling folder to fill; on success it replaces ``final``, on error it is removed.

    The old ``final`` (if any) is moved aside and removed only after the new one is in place.

    Args:
        durable, only_empty: See :func:`swap_in_folder`.
        fixed_name: Fill ``.NAME.partial`` (:func:`fresh_partial_folder`) instead of a unique temporary
            name, so a leftover of a killed attempt is cleaned up by the next one.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = (fresh_partial_folder(final) if fixed_name else
               Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    swap_in_folder(partial, final, durable, only_empty)


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
