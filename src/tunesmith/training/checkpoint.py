"""Checkpoints that resume exactly: trainable weights, optimizer, scheduler, RNG and step.

A checkpoint is written into a temporary folder and renamed into place, so an interrupted write
(Ctrl-C, a crash, a full disk) never leaves a half-written checkpoint that looks complete.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tunesmith.errors import TunesmithError

PREFIX = "step-"


@dataclass
class TrainState:
    """Progress of the loop, saved with every checkpoint."""

    step: int = 0
    tokens: int = 0
    best_metric: Optional[float] = None
    evals_without_improvement: int = 0
    stopped_early: bool = False


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    state: TrainState, keep: int) -> Path:
    """Write ``folder/step-NNNNNNNN`` atomically and delete all but the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{PREFIX}{state.step:08d}"
    partial = folder / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({name: t.contiguous().cpu() for name, t in trainable.items()}, partial / "trainable.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng_state()},
               partial / "training.pt")
    (partial / "state.json").write_text(json.dumps(asdict(state), indent=2))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    for old in list_checkpoints(folder)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def latest_checkpoint(folder: Path) -> Path:
    """The newest complete checkpoint in ``folder``.

    Raises:
        TunesmithError: If there is none to resume from.
    """
    found = list_checkpoints(folder)
    if not found:
        raise TunesmithError(f"no checkpoint to resume from in {folder}; set train.checkpoint_every and train again")
    return found[-1]


def load_checkpoint(path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict, TrainState]:
    """Read a checkpoint: (trainable weights, optimizer/scheduler/RNG states, loop state)."""
    trainable = load_file(path / "trainable.safetensors", device=str(device))
    training = torch.load(path / "training.pt", map_location=device, weights_only=False)
    state = TrainState(**json.loads((path / "state.json").read_text()))
    return trainable, training, state
