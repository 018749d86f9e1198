"""What a run was made from, recorded so that ``tunesmith reproduce`` can run it again and say what differs.

``provenance.json`` in the run folder holds the folder the run was started from (recipe paths are relative
to it), the seed, a SHA-256 digest of every data file the recipe names, the package versions, the number
of threads and processes, and the machine. Weights are bit-identical only on the same machine, threads and
packages; :func:`differences` says which of these changed.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from tunesmith.config import Recipe
from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import file_sha256, write_text_atomic
from tunesmith.core.run_files import RunLayout

PACKAGES = ("torch", "transformers", "peft", "tunesmith", "safetensors", "tokenizers", "numpy")
VERSION = 1


def data_files(recipe: Recipe) -> list[str]:
    """Every data file a recipe reads: training and validation files, those of its sources, the task file."""
    files = [*recipe.data.train, *([recipe.data.validation] if recipe.data.validation else [])]
    for source in recipe.data.sources:
        files += [*source.train, *([source.validation] if source.validation else [])]
    if recipe.eval.task is not None:
        files.append(recipe.eval.task.file)
    return files


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def record_provenance(recipe: Recipe, out: Path, threads: int, world_size: int, device: str) -> dict[str, Any]:
    """Write ``OUTPUT/provenance.json`` (main process, when the run starts) and return what it holds."""
    cwd = Path.cwd()
    record = {
        "version": VERSION,
        "cwd": str(cwd),
        "seed": recipe.train.seed,
        "data": [{"path": name, "sha256": file_sha256(cwd / name), "bytes": (cwd / name).stat().st_size}
                 for name in dict.fromkeys(data_files(recipe)) if (cwd / name).is_file()],
        "packages": package_versions(),
        "threads": threads,
        "world_size": world_size,
        "device": device,
        "machine": {"system": platform.system(), "arch": platform.machine(), "cpus": os.cpu_count(),
                    "python_executable": sys.executable},
    }
    write_text_atomic(RunLayout(out).provenance, json.dumps(record, indent=2) + "\n")
    return record


def read_provenance(run: Path) -> dict[str, Any] | None:
    path = RunLayout(run).provenance
    return json.loads(path.read_text()) if path.is_file() else None


def check_data_unchanged(record: dict[str, Any]) -> None:
    """Refuse to reproduce from data that is not the data the run read.

    Raises:
        TunesmithError: Naming the first file that is missing or whose digest differs.
    """
    cwd = Path(record["cwd"])
    for entry in record["data"]:
        path = cwd / entry["path"]
        if not path.is_file():
            raise TunesmithError(f"data file {path} that the run read is missing; a reproduction needs the same data")
        if file_sha256(path) != entry["sha256"]:
            raise TunesmithError(f"data file {path} changed since the run (its SHA-256 differs from the one recorded "
                                 "in provenance.json); a reproduction needs the same data: restore the file")


def differences(original: dict[str, Any], again: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """What differs between two runs' circumstances (packages, threads, processes, device, machine)."""
    changed: dict[str, tuple[Any, Any]] = {}
    for section in ("packages", "machine"):
        for key in sorted(set(original.get(section, {})) | set(again.get(section, {}))):
            before, after = original.get(section, {}).get(key), again.get(section, {}).get(key)
            if before != after and key != "python_executable":
                changed[f"{section}.{key}"] = (before, after)
    for key in ("threads", "world_size", "device"):
        if original.get(key) != again.get(key):
            changed[key] = (original.get(key), again.get(key))
    return changed
