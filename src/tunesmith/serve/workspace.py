"""The workspace folder: where uploads, recipes, runs, exports and the job store live.

Every path that comes from the browser or the API goes through :meth:`Workspace.resolve`, which
refuses absolute paths, ``..`` and symlinks that lead outside.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from tunesmith.core.errors import TunesmithError

SUBFOLDERS = ("data", "recipes", "runs", "exports", "models", "jobs")
UPLOAD_EXTENSIONS = (".jsonl.gz", ".json.gz", ".csv.gz", ".tsv.gz", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt",
                     ".gz")


class PathRefused(TunesmithError):
    """A path from the browser or the API that is not inside the workspace."""


class NotFound(TunesmithError):
    """A workspace path (or a job, a run) that does not exist (HTTP 404)."""


class Conflict(TunesmithError):
    """A request the current state forbids (HTTP 409): stopping a job that has finished, resuming one that cannot."""


class TooLarge(TunesmithError):
    """An upload over the server's size limit."""


class Workspace:
    """The root folder and the rules for paths under it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        for name in SUBFOLDERS:
            (self.root / name).mkdir(exist_ok=True)

    def resolve(self, relative: str, must_exist: bool = False) -> Path:
        """The absolute path of ``relative``, refused unless it stays inside the workspace.

        Raises:
            PathRefused: If the path is empty, absolute, has ``..`` or a NUL, or resolves (through
                symlinks) outside the workspace.
            NotFound: If it must exist and does not.
        """
        text = str(relative or "").replace("\\", "/")
        parts = PurePosixPath(text).parts
        if not text or "\x00" in text or text.startswith("/") or (len(text) > 1 and text[1] == ":"):
            raise PathRefused(f"path '{relative}' must be relative to the workspace")
        if ".." in parts:
            raise PathRefused(f"path '{relative}' must not contain '..'")
        candidate = (self.root / Path(*parts)).resolve()
        if candidate != self.root and self.root not in candidate.parents:
            raise PathRefused(f"path '{relative}' leads outside the workspace")
        if must_exist and not candidate.exists():
            raise NotFound(f"path '{relative}' does not exist in the workspace")
        return candidate

    def relative(self, path: Path) -> str:
        """``path`` written relative to the workspace, with forward slashes."""
        return Path(os.path.relpath(Path(path).resolve(), self.root)).as_posix()

    def new_upload_path(self, original_name: str) -> Path:
        """A new file in ``data/`` named after the original (sanitised: letters, digits, ``._-``; never an
        existing file's name: ``-2``, ``-3`` ... are added), keeping a known extension."""
        name = PurePosixPath(original_name.replace("\\", "/")).name
        lower = name.lower()
        for extension in UPLOAD_EXTENSIONS:
            if lower.endswith(extension):
                break
        else:
            raise PathRefused(f"upload '{name}' must be one of {', '.join(UPLOAD_EXTENSIONS[3:])} (optionally .gz)")
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name[: -len(extension)]).strip(".-_")[:64] or "upload"
        candidate, number = self.root / "data" / f"{stem}{extension}", 2
        while candidate.exists():
            candidate, number = self.root / "data" / f"{stem}-{number}{extension}", number + 1
        return candidate

    def scrub(self, text: str) -> str:
        """``text`` with the workspace's absolute location removed: messages name workspace paths only."""
        return text.replace(f"{self.root}{os.sep}", "").replace(str(self.root), ".")


def plan_in_workspace(recipe, root: Path):
    """``tunesmith plan`` for the recipe's own method, without a calibration run, its paths read in the workspace:
    the one plan behind the guided path and the Plan screen."""
    from tunesmith.workflows.plan import plan_recipe

    local = recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": absolute(root, recipe.model.name)}),
                                      "data": recipe.data.model_copy(update={
                                          "train": tuple(str(root / p) for p in recipe.data.train),
                                          "validation": str(root / recipe.data.validation) if recipe.data.validation else None})})
    return plan_recipe(local, methods="recipe", calibrate=False, say=lambda *args: None)


def absolute(root: Path, name: str) -> str:
    return str(root / name) if (root / name).is_dir() else name
