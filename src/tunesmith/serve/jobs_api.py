"""Job routes under ``/api/jobs``: submit (train, eval, data step, export), list, progress, stop, resume.

The browser never sends a command line: each job kind has a small typed body from which the
server builds the ``tunesmith`` arguments itself, every path resolved under the workspace (so
no flag such as ``--trust-remote-code`` can come from the browser).
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, Field

from tunesmith.errors import TunesmithError
from tunesmith.serve.studio_api import _read_metrics, unique_path

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
    merge: bool = True


class EvalJob(BaseModel):
    kind: Literal["eval"]
    run: str
    suite: Optional[str] = Field(None, description="Workspace suite file of the task; the bias probe always runs.")
    limit: Optional[int] = Field(None, ge=1)


JobBody = Annotated[Union[TrainJob, DataJob, ExportJob, EvalJob], Field(discriminator="kind")]


@router.post("")
async def submit(body: JobBody, request: Request):
    from tunesmith.config import load_recipe

    workspace, runner = request.app.state.workspace, request.app.state.jobs
    if isinstance(body, TrainJob):
        recipe_file = workspace.resolve(body.recipe, must_exist=True)
        recipe = load_recipe(recipe_file)
        if recipe.model.trust_remote_code:
            raise TunesmithError("trust_remote_code cannot be switched on from the studio; use the command line")
        run_dir = workspace.resolve(recipe.output.dir)
        if workspace.root / "runs" not in run_dir.parents:
            raise TunesmithError(f"{body.recipe}: output.dir must be a folder under runs/")
        args = ["train", str(recipe_file), "--no-progress"]
        job_id = runner.submit("train", f"train {run_dir.name}", args, workspace.relative(run_dir / "summary.json"),
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
        run = workspace.resolve(body.run, must_exist=True)
        result = run / "adapter" if (run / "adapter").is_dir() else run / "model"
        out = unique_path(workspace.root / "exports", f"{run.name}-{'merged' if body.merge else 'adapter'}", "")
        args = ["export", "--adapter", str(result), "--out", str(out)] + (["--merge"] if body.merge else [])
        job_id = runner.submit("export", f"export {run.name}", args, workspace.relative(out / "config.json"
                               if body.merge else out), workspace.relative(run))
    else:
        from tunesmith.serve.pool import ModelPool

        run = workspace.resolve(body.run, must_exist=True)
        result = run / "adapter" if (run / "adapter").is_dir() else run / "model"
        base = ModelPool._base_of(result, workspace.root) if (result / "tunesmith.json").is_file() else str(result)
        out = unique_path(run, "eval", "")
        args = ["eval", "--compare", base, str(run), "--bias", "--out", str(out)]
        if body.suite:
            args += ["--suite", str(workspace.resolve(body.suite, must_exist=True))]
        if body.limit:
            args += ["--limit", str(body.limit)]
        job_id = runner.submit("eval", f"eval {run.name}", args, workspace.relative(out / "report.html"),
                               workspace.relative(run))
    return runner.store.get(job_id)


@router.get("")
async def list_jobs(request: Request):
    return {"jobs": request.app.state.jobs.store.all()}


@router.get("/{job_id}")
async def get_job(job_id: int, request: Request):
    return request.app.state.jobs.store.get(job_id)


@router.get("/{job_id}/progress")
async def progress(job_id: int, request: Request, log_offset: int = Query(0, ge=0),
                   metrics_offset: int = Query(0, ge=0)):
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
        text = chunk.decode("utf-8", errors="replace")
    records = _read_metrics(workspace.root / job["run_dir"]) if job["run_dir"] and job["kind"] == "train" else []
    return {"job": job, "log": text, "log_offset": next_log, "metrics": records[metrics_offset:],
            "metrics_offset": len(records)}


@router.post("/{job_id}/stop")
async def stop(job_id: int, request: Request):
    return request.app.state.jobs.stop(job_id)


@router.post("/{job_id}/resume")
async def resume(job_id: int, request: Request):
    return request.app.state.jobs.resume(job_id)
