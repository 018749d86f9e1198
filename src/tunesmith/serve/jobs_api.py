"""Job routes under ``/api/jobs``: submit (train, eval, data step, export, sweep), list, progress, stop, resume.

The browser never sends a command line: each job kind has a small typed body from which the
server builds the ``tunesmith`` arguments itself, every path resolved under the workspace (so
no flag such as ``--trust-remote-code`` can come from the browser), and every recipe, suite and
search space passes :mod:`tunesmith.serve.safety` first.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field

from tunesmith.core.errors import TunesmithError
from tunesmith.core.run_files import RunLayout
from tunesmith.serve.safety import SafetyRules, refuse_unsafe_recipe, refuse_unsafe_space, refuse_unsafe_suite
from tunesmith.serve.studio_api import _read_metrics, unique_path, yaml_from_browser

router = APIRouter(prefix="/api/jobs")


class TrainJob(BaseModel):
    kind: Literal["train"]
    recipe: str = Field(description="Workspace recipe file (saved by POST /api/recipes).")


class DataJob(BaseModel):
    kind: Literal["data"]
    step: Literal["clean", "dedup", "split"]
    path: str


class ExportJob(BaseModel):
    kind: Literal["export"]
    run: str
    format: Optional[Literal["hf", "peft", "gguf"]] = Field(None, description="Default: hf (merge: false = peft).")
    quantize: Optional[Literal["f16", "q8_0", "q4_0"]] = Field(None, description="GGUF only; default f16.")
    ollama: bool = Field(False, description="GGUF only: also write an Ollama Modelfile.")
    merge: bool = Field(True, description="The older form: true = hf, false = the adapter as it is (peft).")


class SweepJob(BaseModel):
    kind: Literal["sweep"]
    recipe: str = Field(description="Workspace recipe file (saved by POST /api/recipes): every trial's defaults.")
    space: str = Field(max_length=20_000, description="The search space as YAML: dotted recipe field -> range or "
                       "choices (docs/sweep.md).")
    trials: int = Field(8, ge=1, le=200)
    workers: int = Field(1, ge=1, le=16, description="Worker processes running trials of the one study at once.")


class EvalJob(BaseModel):
    kind: Literal["eval"]
    run: str
    suite: Optional[str] = Field(None, description="Workspace suite file of the task; the bias probe always runs.")
    suites: list[str] = Field(default_factory=list, max_length=8, description="More workspace suite files, picked "
                              "from GET /api/jobs/suites.")
    limit: Optional[int] = Field(None, ge=1)


class CaiJob(BaseModel):
    kind: Literal["cai"]
    principles: str = Field(description="Workspace JSONL of {name, critique_request, revision_request}.")
    prompts: str = Field(description="Workspace prompt file (a prompt/instruction/question field, or .txt lines).")
    model: str = Field(description="The model that drafts, critiques and revises: an id of GET /v1/models.")
    limit: Optional[int] = Field(None, ge=1, le=100_000, description="Use only the first N prompts.")
    max_new_tokens: int = Field(256, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0, le=2, description="0 means greedy.")


JobId = Annotated[int, Path(ge=1, le=2**53, description="The job's number (POST /api/jobs gives it).")]
JobBody = Annotated[Union[TrainJob, DataJob, ExportJob, EvalJob, SweepJob, CaiJob], Field(discriminator="kind")]


@router.post("")
async def submit(body: JobBody, request: Request):
    from tunesmith.config import load_recipe

    workspace, runner = request.app.state.workspace, request.app.state.jobs
    if isinstance(body, TrainJob):
        recipe_file = workspace.resolve(body.recipe, must_exist=True)
        recipe = load_recipe(recipe_file)  # a file the browser may have uploaded: the same rules as a saved one
        refuse_unsafe_recipe(recipe, request.app.state.safety)
        run_dir = workspace.resolve(recipe.output.dir)
        args = ["train", str(recipe_file), "--no-progress"]
        job_id = runner.submit("train", f"train {run_dir.name}", args, workspace.relative(RunLayout(run_dir).summary),
                               workspace.relative(run_dir), resume_args=args + ["--resume"])
    elif isinstance(body, DataJob):
        source = workspace.resolve(body.path, must_exist=True)
        stem = source.name.split(".")[0]
        if body.step == "split":
            out = unique_path(source.parent, f"{stem}-split", "")
            args = ["data", "split", str(source), "--out-dir", str(out)]
        else:
            out = unique_path(source.parent, f"{stem}-{body.step}", ".jsonl")
            args = ["data", body.step, str(source), "-o", str(out), "--on-error", "skip"]
        job_id = runner.submit("data", f"{body.step} {source.name}", args, workspace.relative(out))
    elif isinstance(body, ExportJob):
        job_id = submit_export(body, workspace, runner)
    elif isinstance(body, SweepJob):
        job_id = submit_sweep(body, workspace, runner, request.app.state.safety)
    elif isinstance(body, CaiJob):
        job_id = submit_cai(body, workspace, runner, request.app.state.pool)
    else:
        from tunesmith.inference.results import locate_result
        from tunesmith.serve.pool import ModelPool

        run = workspace.resolve(body.run, must_exist=True)
        result = RunLayout(run).saved_result() or RunLayout(run).result("model")
        found = locate_result(result)
        base = ModelPool._base_of(found, workspace.root) if found and found.manifest is not None else str(result)
        out = unique_path(run, "eval", "")
        args = ["eval", "--compare", base, str(run), "--bias", "--out", str(out)]
        for suite in ([body.suite] if body.suite else []) + body.suites:
            refuse_unsafe_suite(suite, request.app.state.safety)
            args += ["--suite", str(workspace.resolve(suite, must_exist=True))]
        if body.limit:
            args += ["--limit", str(body.limit)]
        job_id = runner.submit("eval", f"eval {run.name}", args, workspace.relative(out / "report.html"),
                               workspace.relative(run))
    return runner.store.get(job_id)


def submit_export(body: ExportJob, workspace, runner) -> int:
    """``tunesmith export RUN --format ...`` into ``exports/RUN-FORMAT`` (checked by reloading before it is kept)."""
    run = workspace.resolve(body.run, must_exist=True)
    fmt = body.format or ("hf" if body.merge else "peft")
    if (body.quantize or body.ollama) and fmt != "gguf":
        raise TunesmithError("quantize and ollama apply to the gguf format only")
    name = {"hf": "merged", "peft": "adapter"}.get(fmt) or f"gguf-{body.quantize or 'f16'}"
    out = unique_path(workspace.root / "exports", f"{run.name}-{name}", "")
    args = ["export", str(run), "--format", fmt, "--out", str(out)]
    args += (["--quantize", body.quantize] if body.quantize else []) + (["--ollama"] if body.ollama else [])
    output = out / "config.json" if fmt == "hf" else out
    return runner.submit("export", f"export {run.name} as {fmt}{' ' + body.quantize if body.quantize else ''}", args,
                         workspace.relative(output), workspace.relative(run))


def submit_cai(body: CaiJob, workspace, runner, pool) -> int:
    """``tunesmith cai`` into ``data/PROMPTS-cai/`` (``sft.jsonl`` and ``preference.jsonl``, ready to train on).

    The model is an id the server already serves (a base, an alias, a workspace model, run or export), so the
    browser names no path outside the workspace and no ``--trust-remote-code``.
    """
    principles = workspace.resolve(body.principles, must_exist=True)
    prompts = workspace.resolve(body.prompts, must_exist=True)
    spec = pool.spec(body.model)
    out = unique_path(workspace.root / "data", f"{prompts.name.split('.')[0]}-cai", "")
    args = ["cai", "--principles", str(principles), "--prompts", str(prompts), "--out", str(out), "--model", spec.base,
            "--max-new-tokens", str(body.max_new_tokens), "--temperature", str(body.temperature)]
    args += (["--adapter", spec.adapter] if spec.adapter else []) + (["--limit", str(body.limit)] if body.limit else [])
    return runner.submit("cai", f"cai {prompts.name} with {body.model}", args, workspace.relative(out / "summary.json"))


def suite_choices(workspace, rules: SafetyRules) -> list[dict]:
    """Every suite file in the workspace's ``suites/`` folder: its tasks, or why it cannot run from here."""
    from tunesmith.evaluation.suite import load_suite
    from tunesmith.serve.safety import suite_file_problems

    choices = []
    for file in sorted((workspace.root / "suites").rglob("*.y*ml")) if (workspace.root / "suites").is_dir() else ():
        path = workspace.relative(file)
        problems = suite_file_problems(path, "suite", rules)
        entry = {"path": path, "name": file.stem, "tasks": [], "problem": None}
        if problems:
            entry["problem"] = problems[0].message
        else:
            try:
                suite = load_suite(file)
            except TunesmithError as error:
                if "a suite needs" in str(error):
                    continue  # a task file beside the suites, not a suite
                entry["problem"] = workspace.scrub(str(error))
            else:
                entry["name"], entry["tasks"] = suite.name or file.stem, [f"{t.name} ({t.kind})" for t in suite.tasks]
        choices.append(entry)
    return choices


def submit_sweep(body: SweepJob, workspace, runner, rules: SafetyRules) -> int:
    """``tunesmith sweep RECIPE --space SPACE --trials N`` into ``runs/RECIPE-sweep`` (its trials inside).

    The space is written beside the recipe as ``recipes/RECIPE-space.yaml``; the sweep command checks
    it against the recipe's fields before any trial runs (a wrong field fails the job with the nearest name).
    """
    import yaml

    from tunesmith.core.files import write_text_atomic

    recipe_file = workspace.resolve(body.recipe, must_exist=True)
    space = yaml_from_browser(body.space, "search space")
    if not isinstance(space, dict) or not space:
        raise TunesmithError("the search space must map dotted recipe fields to ranges, e.g. "
                             "'train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}'")
    from tunesmith.config import load_recipe

    recipe = load_recipe(recipe_file)
    refuse_unsafe_recipe(recipe, rules)
    refuse_unsafe_space(recipe, space, rules)
    stem = recipe_file.name.split(".")[0]
    space_file = unique_path(recipe_file.parent, f"{stem}-space", ".yaml")
    write_text_atomic(space_file, yaml.safe_dump(space, sort_keys=False))
    out = unique_path(workspace.root / "runs", f"{stem}-sweep", "")
    args = ["sweep", str(recipe_file), "--space", str(space_file), "--trials", str(body.trials), "--out", str(out),
            "--workers", str(body.workers)]
    return runner.submit("sweep", f"sweep {stem} ({body.trials} trials)", args, workspace.relative(out / "trials.md"),
                         workspace.relative(out), resume_args=args)  # the study on disk continues where it stopped


@router.get("/suites")
async def list_suites(request: Request):
    """The evaluation suites an ``eval`` job can run: the built-in bias probe and the workspace's ``suites/`` files."""
    import asyncio

    found = await asyncio.to_thread(suite_choices, request.app.state.workspace, request.app.state.safety)
    return {"builtin": [{"name": "bias", "what": "counterfactual pairs: does the answer change with the group named? "
                         "(always run)"}], "suites": found}


@router.get("")
async def list_jobs(request: Request):
    return {"jobs": request.app.state.jobs.store.all()}


@router.get("/{job_id}")
async def get_job(job_id: JobId, request: Request):
    return request.app.state.jobs.store.get(job_id)


@router.get("/{job_id}/progress")
async def progress(job_id: JobId, request: Request, log_offset: int = Query(0, ge=0, le=2**53),
                   metrics_offset: int = Query(0, ge=0, le=2**53)):
    """The job, its log from ``log_offset`` (bytes) and its run's metrics from ``metrics_offset`` (records)."""
    runner, workspace = request.app.state.jobs, request.app.state.workspace
    job = runner.store.get(job_id)
    log_file = runner.log_path(job_id)
    text, next_log = "", log_offset
    if log_file.is_file():
        with log_file.open("rb") as handle:
            handle.seek(log_offset)
            chunk = handle.read(1 << 20)
        next_log = log_offset + len(chunk)
        text = workspace.scrub(chunk.decode("utf-8", errors="replace"))  # the page names workspace paths only
    records = _read_metrics(workspace.root / job["run_dir"]) if job["run_dir"] and job["kind"] == "train" else []
    return {"job": job, "log": text, "log_offset": next_log, "metrics": records[metrics_offset:],
            "metrics_offset": len(records)}


@router.post("/{job_id}/stop")
async def stop(job_id: JobId, request: Request):
    return request.app.state.jobs.stop(job_id)


@router.post("/{job_id}/resume")
async def resume(job_id: JobId, request: Request):
    return request.app.state.jobs.resume(job_id)
