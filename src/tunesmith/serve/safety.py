"""What the server refuses from the browser: code it did not choose, models from the hub, paths outside its workspace.

The one home of the studio's and the API's safety rules. Every route that takes a recipe, a recipe
file, a suite file or a search space asks :func:`recipe_problems` (or one of the ``refuse_*``
functions built on it) before anything runs; see the audit table in docs/studio.md.

Three rules:

* **Code.** A field that makes tunesmith import or execute something by name runs code on the
  server's machine: ``model.trust_remote_code``, a reward ``kind: function`` (``module:function``),
  an evaluation task of ``kind: lm_eval`` with an ``include_path`` (lm-eval task YAMLs may name
  Python functions with ``!function``). Refused unless the server was started with
  ``tunesmith serve --allow-code``.
* **Remote models.** A ``model.name`` that is neither a built-in alias, a
  base given at start, nor a folder in the workspace is a Hugging Face hub id: the job would download
  a model the server's owner did not choose. Refused unless the server was started with
  ``tunesmith serve --allow-remote-models``.
* **Paths.** Every file or folder a recipe or suite names lies inside the workspace (no absolute
  path, no ``..``, no symlink out; a base model given at start and tunesmith's own probe files are
  the only exceptions), and a run's ``output.dir`` lies under ``runs/``. Never lifted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from tunesmith.core.errors import TunesmithError
from tunesmith.serve.workspace import PathRefused, Workspace

ALLOW_CODE_FLAG = "--allow-code"
ALLOW_REMOTE_MODELS_FLAG = "--allow-remote-models"


class CodeRefused(TunesmithError):
    """Something from the browser that would run code the server's owner did not choose (HTTP 403)."""


class RemoteModelRefused(TunesmithError):
    """A model from the browser that the server would download from the hub (HTTP 403)."""


@dataclass(frozen=True)
class Problem:
    """One refused field: where it is (dotted), why, and which rule: code (``--allow-code`` lifts it), remote
    (``--allow-remote-models`` lifts it) or else the path rule."""

    loc: str
    message: str
    code: bool = False
    remote: bool = False

    def as_dict(self) -> dict[str, str]:
        return {"loc": self.loc, "message": self.message}

    @property
    def refusal(self) -> type[TunesmithError]:
        return CodeRefused if self.code else RemoteModelRefused if self.remote else PathRefused

    def error(self) -> TunesmithError:
        return self.refusal(f"{self.loc}: {self.message}")


@dataclass(frozen=True)
class SafetyRules:
    """The server's settings the rules depend on.

    Attributes:
        workspace: The workspace every path must stay in.
        bases: Base models given at start (``--model``), by id: their paths are allowed as ``model.name``.
        allow_code: ``serve --allow-code``: lift the code rule (the path rule stays).
        allow_remote_models: ``serve --allow-remote-models``: lift the remote-model rule.
    """

    workspace: Workspace
    bases: dict[str, str]
    allow_code: bool = False
    allow_remote_models: bool = False


def _code(loc: str, what: str) -> Problem:
    return Problem(loc, f"{what} runs code on the server's machine, which the studio refuses unless the server "
                        f"was started with 'tunesmith serve {ALLOW_CODE_FLAG}' (or run it from the command line)",
                   code=True)


def _model(rules: SafetyRules, loc: str, value: str) -> list[Problem]:
    """A model named by the browser: an alias, a base given at start, a workspace path, or a hub id (remote)."""
    from tunesmith.models.aliases import ALIASES
    from tunesmith.models.loading import looks_like_hub_id

    if value in ALIASES or value in rules.bases.values():
        return []
    problems = _path(rules, loc, value)
    if problems or rules.allow_remote_models or not looks_like_hub_id(value):
        return problems
    if rules.workspace.resolve(value).is_dir():  # models/tiny is a workspace folder, not the hub's models/tiny
        return []
    return [Problem(loc, f"'{value}' is not a built-in alias or a folder in the workspace, so the job would download "
                         "it from the Hugging Face hub, which the studio refuses unless the server was started with "
                         f"'tunesmith serve {ALLOW_REMOTE_MODELS_FLAG}' (or put the model folder under models/)",
                    remote=True)]


def _path(rules: SafetyRules, loc: str, value: Optional[str]) -> list[Problem]:
    if value is None:
        return []
    try:
        rules.workspace.resolve(value)
    except TunesmithError as error:
        return [Problem(loc, str(error))]
    return []


def _paths(rules: SafetyRules, loc: str, values: Iterable[str]) -> list[Problem]:
    return [problem for index, value in enumerate(values) for problem in _path(rules, f"{loc}.{index}", value)]


def stage_problems(stage: Any, loc: str, rules: SafetyRules) -> list[Problem]:
    """The stage section's rewards: a function reward is code; a reward model is a path."""
    problems = []
    for index, reward in enumerate(getattr(stage, "rewards", ()) or ()):
        where = f"{loc}.rewards.{index}"
        if reward.kind == "function" and not rules.allow_code:
            problems.append(_code(f"{where}.function", f"the reward function '{reward.function}'"))
        if reward.kind == "model":
            problems += _path(rules, f"{where}.path", reward.path)  # a local folder only (stages/rewards.py)
    return problems


def recipe_problems(recipe: Any, rules: SafetyRules) -> list[Problem]:
    """Every field of a validated recipe that names code or a path outside the workspace.

    Args:
        recipe: A validated :class:`tunesmith.config.Recipe` (a base id already replaced by its path).
        rules: The server's settings.

    Returns:
        The problems, in recipe order (empty when the recipe may run).
    """
    problems: list[Problem] = []
    if recipe.model.trust_remote_code and not rules.allow_code:
        problems.append(_code("model.trust_remote_code", "trust_remote_code (the model's own Python files)"))
    problems += _model(rules, "model.name", recipe.model.name)
    problems += stage_problems(recipe.stage, "stage", rules)
    data = recipe.data
    problems += _paths(rules, "data.train", data.train) + _path(rules, "data.validation", data.validation)
    for index, source in enumerate(data.sources):
        problems += _paths(rules, f"data.sources.{index}.train", source.train)
        problems += _path(rules, f"data.sources.{index}.validation", source.validation)
    if data.prepare is not None:
        problems += _path(rules, "data.prepare.cache_dir", data.prepare.cache_dir)
        if data.prepare.dedup is not None:
            problems += _paths(rules, "data.prepare.dedup.against", data.prepare.dedup.against)
    ewc = recipe.regularise.ewc
    if ewc is not None and ewc.data != "generations":
        problems += _path(rules, "regularise.ewc.data", ewc.data)
    if recipe.retain is not None:
        problems += suite_file_problems(recipe.retain.suite, "retain.suite", rules)
        problems += _paths(rules, "retain.perplexity", recipe.retain.perplexity)
        if recipe.retain.multiple_choice != "builtin":
            problems += _path(rules, "retain.multiple_choice", recipe.retain.multiple_choice)
    if recipe.eval.task is not None:
        problems += _path(rules, "eval.task.file", recipe.eval.task.file)
    report = recipe.eval.report
    if report is not None:
        problems += _path(rules, "eval.report.data_root", report.data_root)
        for field in ("suites", "general_suites"):
            for index, suite in enumerate(getattr(report, field)):
                problems += suite_file_problems(suite, f"eval.report.{field}.{index}", rules)
    output = _path(rules, "output.dir", recipe.output.dir)
    if not output and rules.workspace.root / "runs" not in rules.workspace.resolve(recipe.output.dir).parents:
        output = [Problem("output.dir", "output.dir must be a folder under runs/, such as runs/my-run")]
    return problems + output


def suite_file_problems(value: Optional[str], loc: str, rules: SafetyRules) -> list[Problem]:
    """A suite file named by a recipe or a job: in the workspace, and so is every task file and path in it.

    A suite that does not exist yet or does not load is left to the command that reads it (its
    own one-sentence error); only what it would reach is judged here.
    """
    from tunesmith.evaluation.suite import load_suite
    from tunesmith.evaluation.tasks import PATH_FIELDS, PROBES_DIR

    problems = _path(rules, loc, value)
    if value is None or problems:
        return problems
    file = rules.workspace.resolve(value)
    if not file.is_file():
        return []
    from tunesmith.config.loader import read_yaml

    raw = read_yaml(file, "suite file")
    entries = raw.get("tasks") if isinstance(raw, dict) and isinstance(raw.get("tasks"), list) else []
    for index, entry in enumerate(entries):
        if isinstance(entry, str):
            problems += _inside(rules, f"{loc}: tasks[{index}]", file.parent / entry)
    if isinstance(raw, dict) and raw.get("data_root"):
        problems += _inside(rules, f"{loc}: data_root", file.parent / str(raw["data_root"]))
    if problems:
        return problems
    try:
        suite = load_suite(file)
    except TunesmithError:
        return []
    for task in suite.tasks:
        where = f"{loc}: task {task.name}"
        if task.kind == "lm_eval" and task.include_path and not rules.allow_code:
            problems.append(_code(f"{where}.include_path", "an lm-eval include_path (its task files may name "
                                                           "Python functions)"))
        for field in PATH_FIELDS:
            value_path = getattr(task, field, None)
            if value_path and PROBES_DIR not in Path(value_path).resolve().parents:
                problems += _inside(rules, f"{where}.{field}", Path(value_path))
        if task.kind == "stage":
            problems += stage_problems(task.stage, f"{where}.stage", rules)
    return problems


def _inside(rules: SafetyRules, loc: str, path: Path) -> list[Problem]:
    resolved, root = Path(path).expanduser().resolve(), rules.workspace.root
    if resolved != root and root not in resolved.parents:
        return [Problem(loc, f"path '{path}' leads outside the workspace")]
    return []


def refuse(problems: list[Problem]) -> None:
    """Raise the first problem as its error (403), the others named by count.

    Raises:
        CodeRefused: If the first problem is the code rule.
        RemoteModelRefused: If it is the remote-model rule.
        PathRefused: If it is the path rule.
    """
    if problems:
        first = problems[0]
        more = f" (and {len(problems) - 1} more: {', '.join(p.loc for p in problems[1:])})" if problems[1:] else ""
        raise first.refusal(f"{first.loc}: {first.message}{more}")


def refuse_unsafe_recipe(recipe: Any, rules: SafetyRules) -> None:
    """:func:`recipe_problems`, raised."""
    refuse(recipe_problems(recipe, rules))


def refuse_unsafe_space(recipe: Any, space: dict, rules: SafetyRules) -> None:
    """A sweep's search space: every value a searched field can take, set into the recipe, must pass too.

    Choices can name code or paths (``stage.rewards``, ``data.train``); a range's ends can switch a
    flag on (``model.trust_remote_code: {low: 0, high: 1}``); so each choice and both ends of each
    range are checked in the recipe as a trial would run it (as the sweep command checks them).
    """
    import yaml
    from pydantic import ValidationError

    from tunesmith.config import Recipe, recipe_to_yaml
    from tunesmith.workflows.sweep import trial_recipe

    base = yaml.safe_load(recipe_to_yaml(recipe))
    for key, value in space.items():
        if isinstance(value, list):
            values = value
        elif isinstance(value, dict):
            values = list(value.get("choices") or ()) + [value[end] for end in ("low", "high") if end in value]
        else:
            values = []
        for choice in values:
            try:
                trial = Recipe.model_validate(trial_recipe(copy.deepcopy(base), {str(key): choice}, Path("runs/trial")))
            except (ValidationError, KeyError, TypeError, IndexError, AttributeError):
                continue  # not a recipe a trial could run: the sweep command refuses it before any trial
            problems = recipe_problems(trial, rules)
            refuse([Problem(f"space {key}={choice!r}: {p.loc}", p.message, p.code, p.remote) for p in problems])


def refuse_unsafe_suite(value: str, rules: SafetyRules) -> None:
    """:func:`suite_file_problems` of a job's suite file, raised."""
    refuse(suite_file_problems(value, "suite", rules))


def appendable_data_file(value: str, rules: SafetyRules) -> Path:
    """A ``.jsonl`` file under the workspace's ``data/`` that a route may append to (never a run's or the job store's).

    Raises:
        PathRefused: If it is elsewhere (403).
    """
    file = rules.workspace.resolve(value)
    if file.suffix != ".jsonl" or rules.workspace.root / "data" not in file.parents:
        raise PathRefused(f"path '{value}' must be a .jsonl file under data/, such as data/preferences.jsonl")
    return file
