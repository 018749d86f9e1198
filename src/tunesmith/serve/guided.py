"""The studio's guided path: from what the person wants, in their words, to a whole recipe.

``GET /api/guided/tasks`` lists the tasks; ``POST /api/guided/recipe`` takes the task, the data file (and
an optional test file), the column mapping and the model, and fills stage, format, method, the held-out
metric and the sizes: the lengths and step count from the data, the method checked by
:func:`tunesmith.workflows.plan.plan_recipe` (the same plan as ``tunesmith plan``: memory on this machine and the
data verdict; a plan that does not fit halves the batch). The recipe comes back for the full form, which
stays one click away.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from tunesmith.core.errors import TunesmithError
from tunesmith.serve.studio_data import ColumnMapping
from tunesmith.serve.workspace import plan_in_workspace

router = APIRouter(prefix="/guided")  # under /api (serve/app.py)

TaskName = Literal["label", "answer", "rewrite", "style", "prefer", "score", "practise"]
PreferenceStage = Literal["dpo", "orpo", "simpo", "kto"]
BuiltinReward = Literal["exact_match", "answer_match", "format", "length"]  # never a module:function reward


@dataclass(frozen=True)
class Task:
    """One thing a person may want, and what it means for the recipe."""

    name: str
    title: str
    example: str
    stage: str
    needs: tuple[str, ...]  # the columns of data.columns it reads ('' for a file in a format of its own)
    metric: str


TASKS = {task.name: task for task in (
    Task("label", "Label texts", "sort each headline, ticket or review into one of your categories",
         "cls", ("prompt", "label"), "accuracy on the held-out rows, before (the base model guessing) and after"),
    Task("answer", "Answer questions or chat", "reply the way your example answers do",
         "sft", ("prompt", "answer"), "exact match of the answers on the test file (with a test file; else the "
         "loss on held-out rows), before and after"),
    Task("rewrite", "Summarise or rewrite", "turn each text into its summary, translation or cleaner version",
         "sft", ("prompt", "answer"), "ROUGE-L against the test file's answers (with a test file; else the loss on "
         "held-out rows), before and after"),
    Task("style", "Follow a house style", "write replies in the tone and format of your examples",
         "sft", ("prompt", "answer"), "ROUGE-L against the test file's answers (with a test file; else the loss on "
         "held-out rows), before and after"),
    Task("prefer", "Prefer better answers", "learn from pairs of a better and a worse answer (prompt, chosen, "
         "rejected), such as the ones collected in Chat", "dpo", (), "how often the better answer wins, on held-out "
         "pairs"),
    Task("score", "Score answers", "learn to give a better answer a higher score, from pairs of a better and a worse "
         "answer (prompt, chosen, rejected): a reward model for ranking replies or for reward practice",
         "rm", (), "how often the better answer scores higher, on held-out pairs"),
    Task("practise", "Get answers right by practice", "answer questions whose right answer you have; the model tries "
         "several answers per question and is rewarded for the right one (exact match, the answer a pattern finds, "
         "a required format, a length)", "grpo", ("prompt", "answer"), "the reward on the held-out questions, "
         "before and after"),
)}
PREFERENCE_STAGES = {"dpo": "DPO (the better answer made likelier than the worse, against the model before training)",
                     "orpo": "ORPO (learns the better answers and prefers them, without a reference model)",
                     "simpo": "SimPO (prefers the better answer by its average token likelihood, no reference model)",
                     "kto": "KTO (single answers marked good or bad, no pairs needed)"}
EPOCHS = 3  # passes over the training rows: enough for a small table to be learnt, not memorised
MAX_STEPS = 2000
HELD_OUT = 0.2  # share held out when no test file is given


class RewardBody(BaseModel):
    """One built-in reward of the practice task (user code is never a choice here)."""

    kind: BuiltinReward
    pattern: Optional[str] = Field(None, max_length=500, description="answer_match: the regular expression whose first "
                                   "group is the answer; format: the pattern the reply must match.")
    target: Optional[int] = Field(None, ge=1, le=4096, description="length: the reply length (tokens) not penalised.")
    weight: float = Field(1.0, gt=0, le=100)


class GuidedBody(BaseModel):
    task: TaskName
    preference: PreferenceStage = Field("dpo", description="prefer: which preference method trains.")
    rewards: list[RewardBody] = Field(default_factory=lambda: [RewardBody(kind="exact_match")], min_length=1,
                                      max_length=4, description="practise: the built-in rewards, summed.")
    data: str
    test: Optional[str] = None
    columns: ColumnMapping = ColumnMapping()
    model: Optional[str] = None
    name: Optional[str] = None


@router.get("/tasks")
async def tasks():
    """The tasks the guided path knows, in plain words."""
    return {"tasks": [{"name": t.name, "title": t.title, "example": t.example, "metric": t.metric, "stage": t.stage}
                      for t in TASKS.values()],
            "preference_stages": PREFERENCE_STAGES, "rewards": list(BuiltinReward.__args__)}


@router.post("/recipe")
async def guided_recipe(body: GuidedBody, request: Request):
    """A whole recipe for ``body.task`` on ``body.data``, with the reasons for each choice."""
    from tunesmith.serve.studio_api import safe_recipe, unique_name

    workspace = request.app.state.workspace
    task = TASKS[body.task]
    rows = count_rows(workspace, body.data)
    test_rows = count_rows(workspace, body.test) if body.test else 0
    raw = base_recipe(task, body, rows, test_rows, pick_model(body.model, request),
                      unique_name(workspace, body.name or f"{Path(body.data).stem}-{task.name}"))
    recipe = safe_recipe(raw, request)  # malformed: 400; a model from the hub or a path outside: 403
    try:
        plan, raw = await asyncio.to_thread(planned, raw, recipe, request)
    except TunesmithError as error:
        raise TunesmithError(request.app.state.workspace.scrub(str(error))) from None
    except Exception as error:  # a model the plan cannot build: say so, not a 500
        raise TunesmithError(f"could not work out the plan for {raw['model']['name']}: {error}") from None
    reasons = explain(task, body, raw, rows, test_rows, plan)
    return {"recipe": raw, "reasons": reasons, "plan": plan}


def count_rows(workspace, path: str) -> int:
    from tunesmith.data.readers import read_records

    try:
        return sum(1 for _ in read_records(workspace.resolve(path, must_exist=True), on_bad_line=lambda error: None))
    except TunesmithError as error:
        raise TunesmithError(workspace.scrub(str(error))) from None


def pick_model(wanted: Optional[str], request: Request) -> str:
    """The model asked for, else the first base given at start or in models/, else the built-in default."""
    if wanted:
        return wanted
    entries = request.app.state.pool.list_ids()
    base = next((e["id"] for e in entries if e["kind"] == "base"), None)
    return base or next(e["id"] for e in entries if e["kind"] == "alias")


def base_recipe(task: Task, body: GuidedBody, rows: int, test_rows: int, model: str, name: str) -> dict:
    """The recipe before the plan: stage, data (with the mapping and the held-out part), method and sizes."""
    columns = {role: getattr(body.columns, role) for role in ("prompt", "answer", "label", "system")}
    missing = [role for role in task.needs if not columns[role]]
    if missing:
        raise TunesmithError(f"columns: '{task.title}' needs the {' and '.join(missing)} column; pick "
                             f"{'it' if len(missing) == 1 else 'them'} on the Data screen")
    data: dict = {"train": [body.data], "max_length": 256}
    if task.needs:
        data["columns"] = {role: columns[role] for role in task.needs}
        if task.stage != "cls" and columns["system"]:
            data["columns"]["system"] = columns["system"]
    if body.test:
        data["validation"] = body.test
    elif rows >= 10:
        data["validation_fraction"] = HELD_OUT
    train_rows = rows if body.test else rows - round(rows * HELD_OUT)
    batch = 8
    steps = min(MAX_STEPS, max(10, math.ceil(EPOCHS * train_rows / batch)))
    stage = stage_section(task, body)
    measure = generation_task(task, body, data)
    lr = {"cls": 1e-3, "dpo": 5e-5, "orpo": 5e-5, "simpo": 5e-5, "kto": 5e-5, "rm": 1e-4, "grpo": 1e-5}.get(
        stage["kind"], 2e-4)
    if stage["kind"] == "grpo":  # each step samples a group per prompt: fewer prompts per step, fewer steps
        batch = 2
        steps = min(200, max(10, math.ceil(train_rows / batch)))
    return {"stage": stage, "model": {"name": model}, "data": data,
            "method": {"kind": "lora", "r": 8, "alpha": 16},
            "train": {"max_steps": steps, "batch_size": batch, "lr": lr, "log_every": 1,
                      "checkpoint_every": max(5, steps // 10)},
            "output": {"dir": f"runs/{name}"}, **({"eval": {"task": measure}} if measure else {})}


GENERATION_METRICS = {"answer": ("exact_match", 32), "rewrite": ("rougeL", 96), "style": ("rougeL", 96)}
TASK_ROWS = 40  # held-out rows generated before and after training: enough to see a change, minutes on a CPU


def generation_task(task: Task, body: GuidedBody, data: dict) -> Optional[dict]:
    """``eval.task`` for a generation task with a test file: the task's own metric on its rows, before and after."""
    if task.name not in GENERATION_METRICS or not body.test:
        return None
    metric, tokens = GENERATION_METRICS[task.name]
    return {"file": body.test, "metric": metric, "max_new_tokens": tokens, "limit": TASK_ROWS,
            "columns": dict(data["columns"])}


def stage_section(task: Task, body: GuidedBody) -> dict:
    """The ``stage`` section: the task's stage, the preference method asked for, the built-in rewards."""
    if task.name == "prefer":
        return {"kind": body.preference}
    if task.stage != "grpo":
        return {"kind": task.stage}
    rewards = []
    for reward in body.rewards:
        entry: dict = {"kind": reward.kind, "weight": reward.weight}
        if reward.kind in ("answer_match", "format"):
            if reward.kind == "format" and not reward.pattern:
                raise TunesmithError("rewards: the format reward needs the pattern a good reply matches, "
                                     "e.g. 'Answer: .+'")
            if reward.pattern:
                entry["pattern"] = reward.pattern
        if reward.kind == "length":
            if not reward.target:
                raise TunesmithError("rewards: the length reward needs target, the reply length in tokens")
            entry["target"] = reward.target
        rewards.append(entry)
    return {"kind": "grpo", "rewards": rewards, "group_size": 4, "max_new_tokens": 64}


def planned(raw: dict, recipe, request: Request) -> tuple[dict, dict]:
    """Check the recipe with ``tunesmith plan`` (no calibration run): memory here and the data verdict; halve the
    batch (keeping the examples per step by accumulation) while it does not fit."""
    root = request.app.state.workspace.root
    for _ in range(4):
        plan = plan_in_workspace(recipe, root)
        method = plan.methods[0]
        if method.fits or raw["train"]["batch_size"] == 1:
            break
        train = raw["train"]
        train["batch_size"] //= 2
        train["grad_accum"] = train.get("grad_accum", 1) * 2
        recipe, _ = _recheck(raw, request)
    summary = {"method": method.label, "memory_gb": round(method.memory.total / 2**30, 2), "fits": method.fits,
               "available_gb": round(plan.available_memory / 2**30, 1) if plan.available_memory else None,
               "data_verdict": plan.data["verdict"], "data_note": method.data_note, "recommendation": plan.recommendation,
               "examples": plan.data["examples"], "longest_tokens": plan.data["length"]["max"]}
    longest = plan.data["length"]["p95"] if plan.data["length"] else 0
    raw["data"]["max_length"] = min(1024, max(32, 32 * math.ceil(1.25 * longest / 32)))  # room above the 95th percentile
    return summary, raw


def _recheck(raw: dict, request: Request):
    from tunesmith.serve.studio_api import check_recipe

    recipe, errors = check_recipe(raw, request)
    if recipe is None:
        raise TunesmithError("; ".join(f"{e['loc']}: {e['message']}" for e in errors))
    return recipe, errors


def explain(task: Task, body: GuidedBody, raw: dict, rows: int, test_rows: int, plan: dict) -> list[str]:
    """Each choice in a sentence."""
    data, train = raw["data"], raw["train"]
    held = (f"the {test_rows} rows of {body.test} are kept for measuring" if body.test else
            f"{round(rows * HELD_OUT)} of the {rows} rows are kept aside for measuring" if "validation_fraction" in data
            else f"all {rows} rows train (too few to keep some aside: add a test file to measure the result)")
    reads = {"cls": f"the model reads column '{body.columns.prompt}' and learns to give one of the labels of column "
                    f"'{body.columns.label}' (a small label head on top of it)",
             "sft": f"the model reads column '{body.columns.prompt}' and learns to write column '{body.columns.answer}'",
             "dpo": "the model learns to prefer each pair's chosen answer over its rejected one, by "
                    + PREFERENCE_STAGES[body.preference],
             "rm": "the model learns to score each pair's chosen answer above its rejected one (a score head on top "
                   "of it)",
             "grpo": f"for each question of column '{body.columns.prompt}' the model tries "
                     f"{raw['stage'].get('group_size')} answers and learns from the ones the rewards "
                     f"({', '.join(r['kind'] for r in raw['stage'].get('rewards', ()))}) score above the others, "
                     f"against column '{body.columns.answer}'"}[task.stage]
    memory = f"{plan['memory_gb']} GB" + (f" of the {plan['available_gb']} GB free" if plan["available_gb"] else "")
    measured = (f"{raw['eval']['task']['metric']} of the model's answers to up to {TASK_ROWS} rows of {body.test}, "
                "before and after" if "eval" in raw else task.metric)
    return [f"Task: {task.title.lower()}: {reads}.", f"Measured: {measured}; {held}.",
            f"Method: LoRA (small trainable matrices beside the frozen model; {plan['method']}); needs about {memory}"
            + ("" if plan["fits"] else ": more than this machine has") + ".",
            f"Length: texts up to {data['max_length']} tokens (the longest of yours is {plan['longest_tokens']}).",
            f"Training: {train['max_steps']} steps of {train['batch_size'] * train.get('grad_accum', 1)} "
            + (f"questions, {raw['stage']['group_size']} tries each (about one pass)" if task.stage == "grpo" else
               f"examples (about {EPOCHS} passes over the data)") + f", learning rate {train['lr']}.",
            f"Data: {plan['data_verdict']}"]
