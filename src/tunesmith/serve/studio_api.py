"""The studio's own routes under ``/api``: files, data, recipes, the plan, runs and preferences.

Every screen of the studio is a client of these routes (and of ``/v1`` and ``/api/jobs``);
nothing is reachable only by clicking. Paths in requests are workspace-relative and resolved by
:meth:`Workspace.resolve`.
"""

from __future__ import annotations

import asyncio
import difflib
import json
from pathlib import Path
from typing import Any, Optional

import yaml
from fastapi import APIRouter, File, Query, Request, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field, ValidationError

from tunesmith.config.loader import parse_yaml
from tunesmith.core.errors import TunesmithError
from tunesmith.core.files import atomic_path, write_text_atomic
from tunesmith.core.run_files import RunLayout
from tunesmith.serve.workspace import TooLarge, plan_in_workspace

router = APIRouter(prefix="/api")


def _workspace(request: Request):
    return request.app.state.workspace


# --- files and data --------------------------------------------------------------------------------


@router.get("/files")
async def list_files(request: Request, folder: str = "data"):
    """Files in a workspace folder (not recursive), newest first."""
    root = _workspace(request).resolve(folder, must_exist=True)
    entries = [{"path": _workspace(request).relative(p), "name": p.name, "size": p.stat().st_size,
                "modified": p.stat().st_mtime, "folder": p.is_dir()} for p in root.iterdir() if not p.name.startswith(".")]
    return {"folder": folder, "files": sorted(entries, key=lambda e: -e["modified"])}


@router.post("/upload")
async def upload(request: Request, file: UploadFile = File(...)):
    """Store an uploaded data file under ``data/`` by its own name, sanitised and never replacing a file (size-limited)."""
    workspace, limit = _workspace(request), request.app.state.max_upload_bytes
    target = workspace.new_upload_path(file.filename or "")
    size = 0
    with atomic_path(target) as partial, partial.open("wb") as handle:  # an oversize upload leaves nothing
        while chunk := await file.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"upload is larger than the limit of {limit // (1 << 20)} MiB (serve --max-upload-mb)")
            handle.write(chunk)
    return {"path": workspace.relative(target), "size": size, "original_name": file.filename}


class PreferenceBody(BaseModel):
    messages: list[dict[str, str]] = Field(min_length=1)
    chosen: str
    rejected: str
    chosen_model: Optional[str] = None
    rejected_model: Optional[str] = None
    path: str = "data/preferences.jsonl"


@router.post("/preferences")
async def add_preference(body: PreferenceBody, request: Request):
    """Append one preference pair (``prompt``/``chosen``/``rejected``) to a workspace JSON Lines file."""
    from tunesmith.serve.safety import appendable_data_file

    file = appendable_data_file(body.path, request.app.state.safety)
    prompt_turns = [m for m in body.messages if m.get("role") in ("system", "user", "assistant")]
    record: dict[str, Any] = {"chosen": body.chosen, "rejected": body.rejected,
                              "meta": {"chosen_model": body.chosen_model, "rejected_model": body.rejected_model}}
    if len(prompt_turns) == 1 and prompt_turns[0]["role"] == "user":
        record["prompt"] = prompt_turns[0]["content"]
    else:
        record["messages"] = prompt_turns
    file.parent.mkdir(parents=True, exist_ok=True)
    with file.open("a") as handle:  # appending one whole line: earlier pairs are never rewritten
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    with file.open() as handle:
        count = sum(1 for line in handle if line.strip())
    return {"path": body.path, "pairs": count}


@router.get("/files/raw")
async def raw_file(request: Request, path: str):
    """A workspace file as is (a run's report.html, a plot); HTML is sandboxed away from the API."""
    file = _workspace(request).resolve(path, must_exist=True)
    if not file.is_file():
        raise TunesmithError(f"'{path}' is not a file")
    return FileResponse(file, headers={"Content-Security-Policy": "sandbox allow-scripts",
                                       "X-Content-Type-Options": "nosniff"})


# --- recipes and the plan ------------------------------------------------------------------------


@router.get("/recipe/schema")
async def recipe_schema():
    """The recipe's JSON schema; fields whose values come from a registry (data formats, chat templates) carry
    them as ``enum``, so the form offers a list rather than a free-text box."""
    from tunesmith.config import Recipe
    from tunesmith.data.formats import FORMATS
    from tunesmith.data.templates import TEMPLATES

    schema = Recipe.model_json_schema()
    choices = {"format": ["auto", *FORMATS.names(), "kto"], "template": ["auto", *TEMPLATES.names()]}  # kto: stage kto's own
    for section in ("DataSection", "DataSourceSection"):
        for name, values in choices.items():
            field = schema.get("$defs", {}).get(section, {}).get("properties", {}).get(name)
            if field is not None and field.get("type") == "string":
                field["enum"] = values
    return schema


@router.get("/recipe/models")
async def model_choices(request: Request):
    """Models a recipe can start from: bases given at start, aliases and workspace model folders."""
    return {"models": [e for e in request.app.state.pool.list_ids() if e["kind"] in ("base", "alias", "export")]}


class RecipeBody(BaseModel):
    recipe: dict[str, Any]
    name: Optional[str] = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate_browser_recipe(raw: dict[str, Any], request: Request) -> tuple[Any, list[dict]]:
    """The recipe's own validation of a recipe from the browser: (recipe or None, errors at their fields).

    A base model id given at start (``serve --model ID=PATH``) becomes its path first.
    """
    from tunesmith.config import Recipe
    from tunesmith.config.loader import describe_error

    bases = request.app.state.pool.bases
    raw = json.loads(json.dumps(raw))  # a private copy: the start-given base id becomes its path
    name = (raw.get("model") or {}).get("name") if isinstance(raw.get("model"), dict) else None
    if isinstance(name, str) and name in bases:
        raw["model"]["name"] = bases[name]
    try:
        return Recipe.model_validate(raw), []
    except ValidationError as error:
        return None, [{"loc": ".".join(str(p) for p in item["loc"]), "message": describe_error(item)}
                      for item in error.errors()]


def check_recipe(raw: dict[str, Any], request: Request) -> tuple[Any, list[dict]]:
    """Validate a recipe from the browser: (recipe or None, errors each with its field location).

    Beyond the recipe's own validation, the server's safety rules (:mod:`tunesmith.serve.safety`):
    no code the browser chose, every path in the workspace, the output under ``runs/``.
    """
    from tunesmith.serve.safety import recipe_problems

    recipe, errors = validate_browser_recipe(raw, request)
    if recipe is not None:
        errors = [problem.as_dict() for problem in recipe_problems(recipe, request.app.state.safety)]
    return (None if errors else recipe), errors


def safe_recipe(raw: dict[str, Any], request: Request) -> Any:
    """The validated recipe, or the refusal: malformed is a 400, forbidden by the safety rules a 403."""
    from tunesmith.serve.safety import recipe_problems, refuse

    recipe, errors = validate_browser_recipe(raw, request)
    if recipe is None:
        raise TunesmithError("; ".join(f"{e['loc']}: {e['message']}" for e in errors))
    refuse(recipe_problems(recipe, request.app.state.safety))
    return recipe


@router.post("/recipe/check")
async def recipe_check(body: RecipeBody, request: Request):
    """Validation errors at their fields, and the YAML of what is being built."""
    recipe, errors = check_recipe(body.recipe, request)
    if recipe is not None:
        from tunesmith.config import recipe_to_yaml

        text = recipe_to_yaml(recipe)
    else:
        text = yaml.safe_dump(body.recipe, sort_keys=False)
    return {"valid": not errors, "errors": errors, "yaml": text}


@router.post("/recipe/parse")
async def recipe_parse(request: Request):
    """An uploaded YAML recipe (the request body) back as a mapping for the form."""
    try:
        text = (await request.body()).decode("utf-8")
    except UnicodeDecodeError:
        raise TunesmithError("the recipe is not UTF-8 text; save it as UTF-8 and upload it again") from None
    raw = yaml_from_browser(text, "recipe")
    if not isinstance(raw, dict):
        raise TunesmithError("the recipe must be a mapping of sections (model, data, method, ...)")
    return {"recipe": raw}


@router.post("/recipes")
async def save_recipe(body: RecipeBody, request: Request):
    """Write a valid recipe to ``recipes/NAME.yaml`` (never replacing another)."""
    from tunesmith.config import recipe_to_yaml

    workspace = _workspace(request)
    recipe = safe_recipe(body.recipe, request)
    target = unique_path(workspace.root / "recipes", body.name or "recipe", ".yaml")
    write_text_atomic(target, recipe_to_yaml(recipe))
    return {"path": workspace.relative(target)}


@router.post("/plan")
async def plan(body: RecipeBody, request: Request):
    """What the run will need, as far as it is known before it starts."""
    recipe = safe_recipe(body.recipe, request)
    try:
        return await asyncio.to_thread(estimate_plan, recipe, _workspace(request).root)
    except TunesmithError:
        raise
    except Exception as error:  # a model or method the meta device cannot build: say so, not a 500
        raise TunesmithError(f"could not work out the plan for {recipe.model.name}: {error}") from None


def estimate_plan(recipe, root: Path) -> dict:
    """What ``tunesmith plan`` says of the recipe's own method (no calibration run): parameters, peak memory by
    part on this machine, whether it fits, and the data verdict. The same plan as the guided path's and the CLI's."""
    plan = plan_in_workspace(recipe, root)
    method, mb = plan.methods[0], 2**20
    memory = method.memory
    return {"model": recipe.model.name, "method": method.label, "total_parameters": method.total,
            "trainable_parameters": method.trainable, "trainable_share": method.trainable / max(method.total, 1),
            "memory_mb": round(memory.total / mb, 1),
            "memory_parts_mb": {part: round(getattr(memory, part) / mb, 1) for part in
                                ("weights", "gradients", "optimizer", "activations", "logits", "regularisers", "process")},
            "available_mb": round(plan.available_memory / mb) if plan.available_memory else None, "fits": method.fits,
            "steps": plan.steps, "batch_size": recipe.train.batch_size, "max_length": recipe.data.max_length,
            "data_verdict": plan.data["verdict"], "data_note": method.data_note, "recommendation": plan.recommendation,
            "note": "time per step is measured in the first steps (Train screen), or by `tunesmith plan` on the "
                    "command line"}


# --- runs ----------------------------------------------------------------------------------------------


def _read_metrics(folder: Path) -> list[dict]:
    return RunLayout(folder).read_metrics()


def run_info(folder: Path, workspace) -> dict:
    layout = RunLayout(folder)
    summary = layout.read_summary()
    trackers = summary.trackers if summary is not None and summary.trackers else {}
    return {"path": workspace.relative(folder), "name": folder.name,
            "summary": summary.to_dict() if summary is not None else None,
            "trackers": {name: workspace.scrub(where) for name, where in trackers.items()},  # where each entry is
            "finished": summary is not None, "has_report": layout.report_html.is_file(),
            "modified": folder.stat().st_mtime}


@router.get("/runs")
async def list_runs(request: Request):
    workspace = _workspace(request)
    runs = [run_info(p, workspace) for p in (workspace.root / "runs").iterdir() if p.is_dir()]
    return {"runs": sorted(runs, key=lambda r: -r["modified"])}


@router.get("/runs/metrics")
async def run_metrics(request: Request, path: str, offset: int = Query(0, ge=0)):
    """The records of a run's metrics.jsonl from ``offset`` on (for live curves)."""
    records = _read_metrics(_workspace(request).resolve(path, must_exist=True))
    return {"records": records[offset:], "next_offset": len(records)}


@router.get("/runs/compare")
async def compare_runs(request: Request, runs: list[str] = Query(..., min_length=2)):
    """Two or more runs side by side: curves, headline metrics, and the recipe diff of the first two."""
    workspace = _workspace(request)
    folders = [workspace.resolve(path, must_exist=True) for path in runs]
    configs = [RunLayout(f).config.read_text() if RunLayout(f).config.is_file() else "" for f in folders]
    diff = "".join(difflib.unified_diff(configs[0].splitlines(True), configs[1].splitlines(True),
                                        fromfile=runs[0], tofile=runs[1]))
    return {"runs": [{**run_info(f, workspace), "metrics": _read_metrics(f)} for f in folders], "recipe_diff": diff}


# --- helpers -------------------------------------------------------------------------------------------


def yaml_from_browser(text: str, what: str) -> Any:
    """YAML sent by the browser, read as data only; a syntax error is one sentence naming the line.

    Raises:
        TunesmithError: If it is not valid YAML or nests too deeply.
    """
    return parse_yaml(text, f"the {what} sent", what)


def unique_name(workspace, wanted: str) -> str:
    """A run name from ``wanted`` (letters, digits, ``_.-``) that no run or recipe has yet."""
    import re

    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", wanted).strip(".-_")[:56] or "run"
    name, number = stem, 2
    while (workspace.root / "runs" / name).exists() or (workspace.root / "recipes" / f"{name}.yaml").exists():
        name, number = f"{stem}-{number}", number + 1
    return name


def unique_path(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem<suffix>``, or with -2, -3, ... when taken: nothing existing is replaced."""
    candidate, number = folder / f"{stem}{suffix}", 2
    while candidate.exists():
        candidate, number = folder / f"{stem}-{number}{suffix}", number + 1
    return candidate
