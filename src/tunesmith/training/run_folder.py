"""The output folder of a run: what may be replaced, resumed or cleaned up, checked before the model loads.

Three rules keep a user's files safe:

* ``--overwrite`` only replaces a folder that is recognisably a tunesmith run (``config.yaml``,
  ``summary.json`` or ``checkpoints/``, and nothing a run does not write), never ``.``, ``~``, ``/``
  or a folder holding the current one. The old run is renamed aside (``DIR.tunesmith-old``) and
  removed only when the new run has finished; a rerun that fails before its first checkpoint puts it
  back, so the old result is intact.
* ``--resume`` is checked before anything is rewritten: the run must be unfinished, a whole
  checkpoint must exist (damaged newer ones are skipped with a warning) and ``train.max_steps`` must
  not lie below its step.
* A run that fails before writing its first checkpoint removes what it created, so the corrected
  rerun is not refused as "not empty".

A run folder has one writer at a time: :func:`lock_run` takes an OS lock (``flock``) on
``.NAME.tunesmith-lock`` beside the folder (beside, so that ``--overwrite`` renaming the folder aside
and a failed run removing it leave the lock in place). The kernel releases it when the holder exits,
also on ``kill -9``; the second writer is refused with one sentence naming the holder's pid and command.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterator, Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.core.run_files import RunLayout
from tunesmith.training.checkpoint import checkpoint_step, has_whole_checkpoint, latest_checkpoint, list_checkpoints
from tunesmith.training.fingerprint import fingerprint_changes

MARKERS = RunLayout.markers()
# Everything a run writes into its folder; an --overwrite that finds anything else refuses.
RUN_ENTRIES = RunLayout.entries()
ASIDE_SUFFIX = ".tunesmith-old"
LOCK_SUFFIX = ".tunesmith-lock"


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def is_run_folder(folder: Path) -> bool:
    """True when ``folder`` holds one of a run's marker files (config.yaml, summary.json, checkpoints/)."""
    return folder.is_dir() and any((folder / name).exists() for name in MARKERS)


def _temporary(name: str) -> bool:
    """A run's own leftovers of an interrupted write: ``.NAME...partial``, ``.NAME.old``, a write probe."""
    return name.startswith(".") and (".partial" in name or name.endswith(".old")
                                     or name.startswith(".tunesmith-probe-"))


def foreign_entries(folder: Path) -> list[str]:
    """Names in ``folder`` that no run writes."""
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.name not in RUN_ENTRIES and not _temporary(entry.name))


def refuse_unsafe_replacement(out: Path) -> None:
    """Refuse to replace ``/``, the home folder, the current folder or one above it, or anything but a run.

    Raises:
        TunesmithError: Naming the folder and why it is not replaced.
    """
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved in (Path(resolved.anchor), Path.home().resolve()) or cwd == resolved or resolved in cwd.parents:
        raise TunesmithError(f"--overwrite refuses to replace {out} ({resolved}): it is the root, the home folder, "
                             "or the current folder or one above it; choose a dedicated output.dir")
    if not is_run_folder(out):
        raise TunesmithError(f"--overwrite only replaces a tunesmith run, and {out} has no config.yaml, summary.json "
                             "or checkpoints/; choose another output.dir or empty it yourself")
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise TunesmithError(f"--overwrite would delete files no run writes in {out} ({shown}); "
                             "move them out first or choose another output.dir")


def check_writable(out: Path) -> None:
    """Create ``out`` if needed and make sure files can be written in it.

    Raises:
        TunesmithError: If the folder (or its parent) is read-only or cannot be created.
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(prefix=".tunesmith-probe-", dir=out)
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise TunesmithError(f"cannot write in output folder {out} ({error.strerror or error}); "
                             "choose a writable output.dir") from None


def lock_path(folder: Path) -> Path:
    """Where the lock of the run folder ``folder`` lives: ``.NAME.tunesmith-lock`` in its parent."""
    resolved = folder.expanduser().resolve()
    return resolved.parent / f".{resolved.name}{LOCK_SUFFIX}"


def this_command() -> str:
    """How the lock names its holder: ``tunesmith train r.yaml`` (or the Python command line of an embedding)."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("tunesmith", "__main__.py"):
        program = "tunesmith"
    elif program == "-c":
        program = "python -c"
    return " ".join([program, *sys.argv[1:]])[:300]


@dataclass
class RunLock:
    """An exclusive OS lock on a run folder, held until :meth:`release` (or the process's end)."""

    folder: Path
    path: Path
    handle: IO[str]

    def release(self) -> None:
        """Remove the lock file and let go of the lock (a no-op the second time)."""
        if self.handle.closed:
            return
        with contextlib.suppress(OSError):  # removed while still held: see the inode check in lock_run
            self.path.unlink()
        self.handle.close()


def lock_run(folder: Path) -> RunLock:
    """Become the one writer of the run folder ``folder``, or refuse at once.

    Raises:
        TunesmithError: When another process holds the folder (naming its pid and command), or the lock
            file cannot be created.
    """
    path = lock_path(folder)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(path, "a+", encoding="utf-8")
        except OSError as error:
            raise TunesmithError(f"cannot write in output folder {folder}: its lock file {path} cannot be created "
                                 f"({error.strerror or error}); choose a writable output.dir") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "pid unknown"
            handle.close()
            raise TunesmithError(f"output folder {folder} is being written by another tunesmith process ({holder}); "
                                 "wait for it to finish or choose another output.dir") from None
        try:  # the holder may have removed the file between our open and our lock: lock the file that is there now
            current = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}: {this_command()}\n")
    handle.flush()
    return RunLock(folder, path, handle)


@contextlib.contextmanager
def writing_into(out: Path) -> Iterator[None]:
    """Hold the lock of the run that ``out`` lies in (``RUN/eval``, ``RUN/gguf``) while writing it."""
    parent = out.expanduser().resolve().parent
    if not is_run_folder(parent):
        yield
        return
    lock = lock_run(parent)
    try:
        yield
    finally:
        lock.release()


@dataclass
class RunFolder:
    """The checked output folder of one run.

    Attributes:
        out: The folder the run writes into.
        resume_from: The whole checkpoint to resume from (None for a new run).
        replaced: Where ``--overwrite`` put the run it replaces until this one finishes.
        fresh: The folder was empty or missing, so everything in it is this run's.
        made: The folder did not exist before this run.
        lock: This process's lock on the folder (the main process's; None on the others).
        fingerprint: What the run trains on (:func:`training.fingerprint.run_fingerprint`), saved with each checkpoint.
    """

    out: Path
    resume_from: Optional[Path] = None
    replaced: Optional[Path] = None
    fresh: bool = False
    made: bool = False
    lock: Optional[RunLock] = None
    fingerprint: Optional[dict] = None

    def release(self) -> None:
        """Let the next writer in (after :meth:`finished` or :meth:`failed`)."""
        if self.lock is not None:
            self.lock.release()

    def finished(self) -> None:
        """The run completed: the run it replaced goes (also after an interrupted --overwrite was resumed)."""
        aside = self.replaced or self.out.with_name(self.out.name + ASIDE_SUFFIX)
        if aside.is_dir() and is_run_folder(aside):
            shutil.rmtree(aside)

    def failed(self, warn: Callable[[str], None] = _warn) -> None:
        """The run stopped early: keep it if it has a checkpoint, else remove it and restore what it replaced."""
        if list_checkpoints(self.out / "checkpoints") or not (self.fresh or self.replaced):
            if self.replaced is not None:
                warn(f"the run replaced by --overwrite is kept in {self.replaced} until this one finishes")
            return
        _empty(self.out)
        if self.made or self.replaced is not None:
            self.out.rmdir()
        if self.replaced is not None:
            self.replaced.rename(self.out)
            warn(f"the previous run in {self.out} was left as it was")


def open_run_folder(out: Path, resume: bool, overwrite: bool, max_steps: Optional[int] = None,
                    is_main: bool = True, warn: Callable[[str], None] = _warn, fingerprint: Optional[dict] = None,
                    allow_changes: bool = False) -> RunFolder:
    """Check the output folder for a new, replacing or resumed run, before any model is loaded.

    Args:
        out: The recipe's ``output.dir``.
        resume: ``--resume`` was given.
        overwrite: ``--overwrite`` (``output.overwrite``) was given.
        max_steps: The recipe's ``train.max_steps``, checked against the checkpoint's step.
        is_main: Only the main process moves and creates folders.
        warn: Told about damaged checkpoints that were skipped.
        fingerprint: What this run trains on; ``--resume`` compares it with the checkpoint's.
        allow_changes: ``--allow-changes``: resume although the recipe or data changed (with a warning).

    Raises:
        TunesmithError: For anything that would lose a user's file or cannot continue, as one sentence;
            also when another process is writing the folder.
    """
    out = out.expanduser()
    if out.exists() and not out.is_dir():
        raise TunesmithError(f"output.dir {out} is a file; give a folder")
    lock = lock_run(out) if is_main else None
    try:
        folder = _opened(out, resume, overwrite, max_steps, is_main, warn, fingerprint, allow_changes)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    folder.lock, folder.fingerprint = lock, fingerprint
    return folder


def _opened(out: Path, resume: bool, overwrite: bool, max_steps: Optional[int], is_main: bool,
            warn: Callable[[str], None], fingerprint: Optional[dict], allow_changes: bool) -> RunFolder:
    occupied = out.is_dir() and any(out.iterdir())
    if resume:
        checkpoint = _checked_resume(out, occupied, max_steps, warn)
        if fingerprint is not None:
            _check_unchanged(checkpoint, fingerprint, allow_changes, warn)
        return RunFolder(out, resume_from=checkpoint)
    if occupied and not overwrite and stopped_before_first_checkpoint(out):
        # Killed before its first checkpoint (kill -9, a lost machine): nothing to resume, so the same command
        # starts it again rather than refusing a folder that neither a rerun nor --resume could use.
        warn(f"output folder {out} holds a run that stopped before its first checkpoint; starting it again")
        if is_main:
            _empty(out)
        occupied = False
    if not occupied:
        made = not out.exists()
        if is_main:
            check_writable(out)
        return RunFolder(out, fresh=True, made=made)
    if not overwrite:
        raise TunesmithError(f"output folder {out} is not empty; choose another output.dir, continue it with "
                             "--resume, or replace it with --overwrite")
    refuse_unsafe_replacement(out)
    aside = out.with_name(out.name + ASIDE_SUFFIX)
    if aside.exists():
        finish = ("finish that run with --resume" if has_whole_checkpoint(out / "checkpoints") else
                  "run the same command without --overwrite to start that run again")
        raise TunesmithError(f"{aside} still holds a run replaced by an earlier --overwrite that did not finish; "
                             f"delete or move it, or {finish}")
    if is_main:
        try:
            out.rename(aside)
        except OSError as error:
            raise TunesmithError(f"cannot replace output folder {out} ({error.strerror or error}); "
                                 "choose a writable output.dir") from None
        check_writable(out)
    return RunFolder(out, replaced=aside, fresh=True, made=True)


def _empty(folder: Path) -> None:
    for entry in folder.iterdir() if folder.is_dir() else ():
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def stopped_before_first_checkpoint(out: Path) -> bool:
    """A run folder holding only what a run writes, unfinished and without a whole checkpoint to resume from."""
    if (out / "summary.json").exists() or foreign_entries(out) or has_whole_checkpoint(out / "checkpoints"):
        return False
    # Killed while the model loaded, before config.yaml: only the scores kept for a rerun are there.
    early = all(entry.name.endswith("_before.json") or _temporary(entry.name) for entry in out.iterdir())
    return is_run_folder(out) or early


def _check_unchanged(checkpoint: Path, fingerprint: dict, allow_changes: bool, warn: Callable[[str], None]) -> None:
    """Refuse (or with ``--allow-changes`` warn) when the recipe or data differ from the checkpoint's."""
    try:
        saved = json.loads((checkpoint / "state.json").read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        saved = None
    changes = fingerprint_changes(saved, fingerprint)
    if not changes:
        return
    shown = "; ".join(changes[:5]) + (f"; and {len(changes) - 5} more" if len(changes) > 5 else "")
    if allow_changes:
        warn(f"warning: resuming {checkpoint} although the run changed since it was written ({shown}); "
             "the result will differ from an uninterrupted run")
        return
    raise TunesmithError(f"the run changed since checkpoint {checkpoint} was written ({shown}); resume continues "
                         "the same run exactly, so undo the change, or continue with the change using "
                         "--resume --allow-changes")


def _checked_resume(out: Path, occupied: bool, max_steps: Optional[int], warn: Callable[[str], None]) -> Path:
    if not occupied:
        raise TunesmithError(f"nothing to resume: output folder {out} is empty or missing")
    if (out / "summary.json").is_file():
        raise TunesmithError(f"the run in {out} has finished (it has summary.json), so there is nothing to resume; "
                             "to train further, start a new run with another output.dir")
    check_writable(out)
    checkpoint = latest_checkpoint(out / "checkpoints", warn)
    step = checkpoint_step(checkpoint)
    if max_steps is not None and step > max_steps:
        raise TunesmithError(f"train.max_steps={max_steps} is below step {step} of checkpoint {checkpoint}; "
                             f"set train.max_steps to at least {step} to resume")
    return checkpoint
