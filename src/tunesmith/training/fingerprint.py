"""What a run trains on, saved with every checkpoint, so that ``--resume`` notices a change.

Resume promises the run an uninterrupted one would have been. The fingerprint holds the recipe's
values that shape the trajectory (everything but where and how often the run writes and logs, and
the evaluation that does not feed back into training), with the SHA-256 of each data file in place of its name;
:func:`fingerprint_changes` names what differs between the checkpoint's and today's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

from tunesmith.core.files import file_sha256

# Recipe fields that do not change the weights a run reaches: where it writes, how often it logs and
# checkpoints, what it evaluates only for the report.
# train.device: a checkpoint resumes on another device (the numbers differ by rounding only). The per-process
# batch and accumulation count as the global batch they make with the world size (FSDP resumes at 1, 2 or 4).
NOT_TRAJECTORY = ("output.", "train.log_every", "train.checkpoint_every", "train.keep_checkpoints",
                  "eval.task", "eval.report", "eval.batch_size", "train.device", "train.batch_size", "train.grad_accum")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, inner in value.items():
            flat.update(_flat(inner, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _digest(name: str) -> str:
    """``sha256:...`` of a data file (of every file under a folder), or ``missing``."""
    path = Path(name).expanduser()
    if path.is_file():
        return "sha256:" + file_sha256(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{file_sha256(file)}\0".encode())
        return "sha256:" + digest.hexdigest()
    return "missing"


def _by_content(section: dict) -> None:
    """Replace the data file names of a ``data`` (or source) section by their contents' digests, in place."""
    section["train"] = [_digest(name) for name in section["train"]]
    if section.get("validation"):
        section["validation"] = _digest(section["validation"])


def run_fingerprint(recipe, world_size: int = 1) -> dict:
    """``{"recipe": {dotted field: value}}`` of what shapes the run's trajectory.

    Data files count by content, not by name (``sha256:...`` in place of the path), so a project moved
    to another folder resumes, and a file edited in place does not.
    """
    dump = recipe.model_dump(mode="json")
    _by_content(dump["data"])
    for source in dump["data"].get("sources") or ():
        _by_content(source)
    fields = _flat(dump)
    kept = {key: value for key, value in fields.items()
            if not any(key == skip or key.startswith(skip if skip.endswith(".") else skip + ".") for skip in NOT_TRAJECTORY)}
    kept["train.global_batch"] = recipe.train.batch_size * recipe.train.grad_accum * world_size
    return {"recipe": kept}


def fingerprint_changes(saved: Optional[dict], current: dict) -> list[str]:
    """What differs, as short phrases (``train.lr 0.001 -> 0.0005``, ``data.train: other contents``); [] if nothing.

    A checkpoint without a fingerprint (written before tunesmith kept one) has nothing to compare.
    """
    if not isinstance(saved, dict):
        return []
    changes = []
    before, after = saved.get("recipe") or {}, current["recipe"]
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if "sha256:" in f"{old}{new}":
            changes.append(f"{key}: the data differs from the checkpoint's")
        else:
            changes.append(f"{key} {_show(old)} -> {_show(new)}")
    return changes


def _show(value: Any) -> str:
    text = "unset" if value is None else str(value)
    return text if len(text) <= 60 else text[:57] + "..."
