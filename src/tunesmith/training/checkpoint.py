"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG and step.

A checkpoint is written into a temporary folder, every file and the folder are synced to disk, a
``manifest.json`` records each file's size and SHA-256, and only then is the folder renamed into
place; older checkpoints are removed after that. An interrupted write (Ctrl-C, ``kill -9``, a full
disk) therefore never leaves a half-written checkpoint that looks complete, and resume checks each
candidate against its manifest, falling back to the newest one that is whole.

Nothing here unpickles arbitrary objects: ``training.pt`` is read with ``weights_only=True`` (the
RNG states are stored as tensors), so a planted file cannot run code on ``--resume``.
"""

from __future__ import annotations

import errno
import json
import pickle
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_folder, file_sha256

PREFIX = "step-"
MANIFEST = "manifest.json"
FILES = ("trainable.safetensors", "training.pt", "state.json")
REQUIRED = ("training.pt", "state.json")  # in every layout, plain or sharded


@dataclass
class TrainState:
    """Progress of the loop, saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    best_metric: Optional[float] = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    fingerprint: Optional[dict] = None  # what the run trains on: see run_fingerprint (None in older checkpoints)


def rng_state() -> dict[str, torch.Tensor]:
    """Python, NumPy, torch (and CUDA) generator states, all as tensors (loadable with weights_only)."""
    version, python_state, gauss = random.getstate()
    _, keys, position, has_gauss, cached_gauss = np.random.get_state()
    state = {
        "python": torch.tensor([version, *python_state], dtype=torch.int64),
        "python_gauss": torch.tensor([] if gauss is None else [gauss], dtype=torch.float64),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_rest": torch.tensor([position, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state.update({f"cuda:{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    python = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((python[0], tuple(python[1:]), gauss[0] if gauss else None))
    position, has_gauss = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), position, has_gauss,
                         float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])
    cuda = [state[f"cuda:{i}"] for i in range(len(state)) if f"cuda:{i}" in state]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def is_disk_full(error: BaseException) -> bool:
    """True for "no space left" / "quota exceeded", also when safetensors wraps it in its own error."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(error) or "os error 28" in str(error)


def _write_files(partial: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler, state: TrainState) -> None:
    save_file({name: t.contiguous().cpu() for name, t in trainable.items()}, partial / "trainable.safetensors")
    with (partial / "training.pt").open("wb") as handle:  # a Python file: a full disk raises OSError(ENOSPC)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
                   handle)
    (partial / "state.json").write_text(json.dumps(asdict(state), indent=2))
    write_checkpoint_manifest(partial, state.step)


def write_checkpoint_manifest(partial: Path, step: int) -> None:
    """Record the size and SHA-256 of every file of a checkpoint being written in ``manifest.json``.

    Plain checkpoints hold :data:`FILES`; sharded ones (``train.distributed: fsdp``) a shard folder,
    the RNG of every process, ``training.pt`` and ``state.json``: every file is listed, whatever the
    layout. The folder is then put in place with ``swap_in_folder(..., durable=True)``, which flushes
    the files and the manifest to disk before the rename.
    """
    files = {}
    for file in sorted(p for p in partial.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[file.relative_to(partial).as_posix()] = {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
    (partial / MANIFEST).write_text(json.dumps({"format": 1, "step": step, "files": files}, indent=2))


def save_checkpoint(folder: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: TrainState, keep: int) -> Path:
    """Write ``folder/step-NNNNNNNN`` atomically and durably, then delete all but the newest ``keep``.

    Raises:
        TunesmithError: If the disk filled up while writing; the partial checkpoint is removed and
            the previous ones are kept.
    """
    final = folder / f"{PREFIX}{state.step:08d}"
    try:  # a checkpoint of the same step from an earlier attempt is replaced
        with atomic_folder(final, durable=True, fixed_name=True) as partial:
            _write_files(partial, trainable, optimizer, scheduler, state)
    except Exception as error:
        if not is_disk_full(error):
            raise
        previous = list_checkpoints(folder)
        if previous:
            raise TunesmithError(f"disk full while writing checkpoint {state.step} in {folder}; the last complete "
                                 f"checkpoint is {previous[-1]}; free some space and continue with --resume") from None
        # No checkpoint to continue from: the run folder is removed (or what --overwrite replaced put back).
        raise TunesmithError(f"disk full while writing checkpoint {state.step} in {folder}, the run's first; "
                             "free some space and start the run again with the same command") from None
    prune_checkpoints(folder, keep)
    return final


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints in ``folder``."""
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders (complete or not: see :func:`checkpoint_problem`), oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why the checkpoint in ``path`` cannot be resumed from (None when every file matches its manifest)."""
    manifest_path = path / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{MANIFEST} is missing or unreadable"
    if not isinstance(files, dict):
        return f"{MANIFEST} is unreadable"
    for name in sorted(set(files) | set(REQUIRED)):
        expected = files.get(name)
        file = path / name
        if not isinstance(expected, dict) or not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected.get("bytes"):
            return f"{name} has {file.stat().st_size:,} bytes, {expected.get('bytes')} expected"
        if file_sha256(file) != expected.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


def latest_checkpoint(folder: Path, warn: Callable[[str], None] = lambda message: None) -> Path:
    """The newest checkpoint in ``folder`` whose files match its manifest; damaged newer ones are skipped.

    Args:
        warn: Told about every damaged checkpoint that was skipped.

    Raises:
        TunesmithError: If there is no whole checkpoint to resume from.
    """
    found = list_checkpoints(folder)
    damaged = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for name, why in damaged:
                warn(f"warning: checkpoint {name} is damaged ({why}); resuming from {path.name} instead")
            return path
        damaged.append((path.name, problem))
    if damaged:
        details = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise TunesmithError(f"no whole checkpoint to resume from in {folder} ({details}); "
                             "start the run again with the same command without --resume")
    raise TunesmithError(f"no checkpoint to resume from in {folder} (the run stopped before its first); start it "
                         "again with the same command without --resume (train.checkpoint_every sets how often "
                         "checkpoints are written)")


def last_complete_checkpoint(folder: Optional[Path]) -> str:
    """``the last complete checkpoint is ...`` for messages (without hashing: a quick look)."""
    found = list_checkpoints(folder) if folder else []
    whole = [p for p in found if (p / MANIFEST).is_file()]
    return f"the last complete checkpoint is {whole[-1]}" if whole else "no checkpoint was written"


def has_whole_checkpoint(folder: Path) -> bool:
    """True when ``folder`` (a run's ``checkpoints/``) holds a checkpoint that can be resumed from."""
    return any(checkpoint_problem(path) is None for path in list_checkpoints(folder))


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint was written at (from its state.json)."""
    return int(json.loads((path / "state.json").read_text())["step"])


def _safe_globals() -> list:
    """Classes an optimizer state may hold besides tensors: GaLore keeps its projector objects."""
    try:
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError:
        return []
    return [GaLoreProjector]


def load_checkpoint(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict, TrainState]:
    """Read a checkpoint: (trainable weights, optimizer/scheduler/RNG states, loop state)."""
    trainable = load_file(path / "trainable.safetensors", device=str(device))
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            training = torch.load(path / "training.pt", map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise TunesmithError(f"{path / 'training.pt'} holds objects other than tensors and numbers; refusing to load "
                             "it (it may run code); resume from a checkpoint that tunesmith wrote") from None
    training["rng"] = {name: tensor.cpu() for name, tensor in training["rng"].items()}
    state = TrainState(**json.loads((path / "state.json").read_text()))
    return trainable, training, state
