"""``tunesmith sweep``: hyper-parameter search through Optuna, each trial a normal run folder.

The search space is a YAML file mapping dotted recipe fields to a range or a list of choices::

    train.lr: {low: 1.0e-5, high: 1.0e-2, log: true}   # float range (log scale)
    train.max_steps: {low: 10, high: 40, step: 10}      # integer range
    method.r: {choices: [4, 8, 16]}                     # categorical
    method.kind: {choices: [lora, ia3]}                 # method fields apply where the kind has them

The study lives in ``OUT/study.db`` (SQLite): running the same command again continues it
(after Ctrl-C or a crash) up to ``--trials`` finished trials. The first trial is the recipe's own
settings, so the table shows what the search gained over the defaults. Trials whose validation
loss falls behind the median of earlier trials at the same step are pruned (``MedianPruner``).
Written: ``OUT/trial-NNN/`` (run folders), ``OUT/trials.md`` (the table), ``OUT/sweep.png`` (the
plot) and ``OUT/best.yaml`` (the best recipe, ready to train).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

from tunesmith.config import Recipe, load_recipe, recipe_to_yaml, validate_recipe
from tunesmith.config.loader import read_yaml, validate_method
from tunesmith.core.errors import TunesmithError, missing_file
from tunesmith.core.files import atomic_path, write_text_atomic
from tunesmith.core.registry import did_you_mean
from tunesmith.core.run_files import RunLayout
from tunesmith.core.runtime import configure_threads
from tunesmith.pipeline.finetune import Interrupted, finetune
from tunesmith.training.hooks import Hook

OBJECTIVES = ("val_loss", "task")


@dataclass(frozen=True)
class Dimension:
    """One searched field: a float or integer range, or a list of choices."""

    path: str
    low: Optional[float] = None
    high: Optional[float] = None
    log: bool = False
    step: Optional[float] = None
    choices: Optional[tuple] = None

    def suggest(self, trial):
        if self.choices is not None:
            return trial.suggest_categorical(self.path, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int) and (self.step is None or isinstance(self.step, int)):
            return trial.suggest_int(self.path, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), log=self.log,
                                   step=None if self.step is None else float(self.step))


def read_space(path: str | Path, raw_recipe: dict) -> list[Dimension]:
    """Read and check the search space against the recipe's fields.

    Raises:
        TunesmithError: Naming the space file and key: unknown recipe field (with the nearest one),
            or a malformed range.
    """
    path = Path(path)
    if not path.is_file():
        raise missing_file(path, "search space file")
    spec = read_yaml(path, "search space file") or {}
    if not isinstance(spec, dict) or not spec:
        raise TunesmithError(f"{path} must map dotted recipe fields to ranges, e.g. 'train.lr: {{low: 1e-5, high: 1e-3, "
                             "log: true}'")
    kinds = spec.get("method.kind", {}).get("choices", ()) if isinstance(spec.get("method.kind"), dict) else ()
    dimensions = []
    for key, value in spec.items():
        check_field(str(key), raw_recipe, tuple(kinds), path)
        dimensions.append(parse_dimension(str(key), value, path))
    return dimensions


def check_field(key: str, raw: dict, kinds: tuple, source: Path) -> None:
    """The dotted ``key`` must name a field of the recipe (method fields: of some searched kind)."""
    parts = key.split(".")
    if parts[0] == "method" and len(parts) == 2 and kinds:
        fields = set().union(*(method_fields(kind) for kind in kinds)) | set(raw["method"])
        if parts[1] not in fields:
            raise TunesmithError(f"{source}: '{key}' is not a field of the methods searched ({', '.join(kinds)})."
                                 f"{nearest(parts[1], sorted(fields))}")
        return
    node: Any = raw
    for depth, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            choices = sorted(node) if isinstance(node, dict) else []
            prefix = ".".join(parts[:depth])
            hint = nearest(part, choices)
            hint = hint.replace("'", f"'{prefix}.", 1) if prefix and hint else hint
            raise TunesmithError(f"{source}: '{key}' is not a recipe field.{hint} (tunesmith config lists every field)")
        node = node[part]
    if isinstance(node, dict):
        raise TunesmithError(f"{source}: '{key}' is a section, not a field; name one of its fields "
                             f"({', '.join(sorted(node))})")


def nearest(name: str, choices: list[str]) -> str:
    """A " Did you mean 'x'?" hint: a field the name starts with (``rank`` -> ``r``), else the closest spelling."""
    prefixes = [choice for choice in choices if name.startswith(choice) or choice.startswith(name)]
    if prefixes:
        return f" Did you mean '{max(prefixes, key=len)}'?"
    return did_you_mean(name, choices)


def method_fields(kind: str) -> set[str]:
    return set(type(validate_method({"kind": kind})).model_fields)


def parse_dimension(key: str, value: Any, source: Path) -> Dimension:
    if isinstance(value, list):
        value = {"choices": value}
    if not isinstance(value, dict):
        raise TunesmithError(f"{source}: '{key}' needs {{low:, high:}} or {{choices: [...]}}, got {value!r}")
    unknown = set(value) - {"low", "high", "log", "step", "choices"}
    if unknown:
        raise TunesmithError(f"{source}: '{key}' has unknown setting '{sorted(unknown)[0]}' (use low, high, log, step, "
                             "choices)")
    if "choices" in value:
        if not value["choices"]:
            raise TunesmithError(f"{source}: '{key}' has an empty choices list")
        return Dimension(key, choices=tuple(value["choices"]))
    if "low" not in value or "high" not in value or not value["low"] < value["high"]:
        raise TunesmithError(f"{source}: '{key}' needs low < high")
    if value.get("log") and value["low"] <= 0:
        raise TunesmithError(f"{source}: '{key}' has log: true, so low must be above 0")
    return Dimension(key, value["low"], value["high"], bool(value.get("log", False)), value.get("step"))


def trial_recipe(base: dict, params: dict[str, Any], out: Path) -> dict:
    """The recipe of one trial: ``base`` with each dotted parameter set, writing into ``out``."""
    import copy

    raw = copy.deepcopy(base)
    kind = params.get("method.kind", raw["method"]["kind"])
    if kind != raw["method"]["kind"]:
        raw["method"] = {"kind": kind}  # another method: its own defaults, plus the searched fields it has
    for key, value in params.items():
        *parents, leaf = key.split(".")
        if parents == ["method"] and leaf not in method_fields(kind):
            continue  # a field of another searched kind
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value
    raw["output"] = {**raw["output"], "dir": str(out), "overwrite": True}
    return raw


class PruningHook(Hook):
    """Report each validation loss to Optuna; when the pruner says so, stop the run as early stopping does.

    The pruned trial's run then finishes like any other (result, summary, metrics), so the folder the table
    names exists; :func:`run_trial` marks the trial pruned afterwards.
    """

    def __init__(self, trial) -> None:
        self.trial = trial
        self.pruned: Optional[str] = None

    def on_log(self, record: dict[str, Any]) -> None:
        if "val_loss" in record and record["val_loss"] is not None and self.pruned is None:
            self.trial.report(float(record["val_loss"]), int(record["step"]))
            if self.trial.should_prune():
                self.pruned = f"val_loss {record['val_loss']:.4f} at step {record['step']}"

    def wants_stop(self) -> bool:
        return self.pruned is not None


class TrialProgress(Hook):
    """A trial's logged steps as lines (``trial 3: step 20/100, loss 1.9312``): trials run without a progress bar
    (workers share the terminal), and a long trial must not be silent."""

    def __init__(self, number: int, say) -> None:
        self.number, self.say, self.total = number, say, 0

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        self.total = total_steps

    def on_log(self, record: dict[str, Any]) -> None:
        shown = [f"{key} {record[key]:.4f}" for key in ("loss", "val_loss") if isinstance(record.get(key), float)]
        self.say(f"trial {self.number}: step {record.get('step')}/{self.total}" + "".join(f", {s}" for s in shown))


@dataclass
class SweepResult:
    """The study after this command, and where its outputs are."""

    out: Path
    objective: str
    rows: list[dict]
    best: Optional[dict]
    best_recipe: Optional[Path]

    def describe(self) -> str:
        lines = [markdown_table(self.rows, self.objective)]
        if self.best is not None:
            default = next((r for r in self.rows if r["number"] == 0 and r["value"] is not None), None)
            gain = ""
            if default is not None:
                gain = f" ({self.objective} {default['value']:.4f} with the recipe's own settings)"
            lines.append(f"best: trial {self.best['number']}, {self.objective} {self.best['value']:.4f}{gain}; "
                         f"recipe in {self.best_recipe}")
        lines.append(f"table in {self.out / 'trials.md'}, plot in {self.out / 'sweep.png'}")
        return "\n".join(lines)


def run_sweep(recipe_path: str | Path, space_path: str | Path, trials: int = 8, out: Optional[str | Path] = None,
              objective: str = "val_loss", pruning: bool = True, say=print, storage: Optional[str] = None,
              workers: int = 1, heartbeat: int = 30) -> SweepResult:
    """Search the space for ``trials`` finished trials in all (continuing a study already in ``out``).

    Args:
        storage: An Optuna storage URL shared by every worker (``postgresql://...`` for several machines, each
            running the same command); default ``sqlite:///OUT/study.db``.
        workers: Worker processes on this machine, each running trials of the one study.
        heartbeat: Seconds between a worker's heartbeats; a killed worker's trial is retried after three.

    Raises:
        TunesmithError: For an unknown objective, a bad space file, or a recipe without what the
            objective needs (validation data, or ``eval.task``).
    """

    if objective not in OBJECTIVES:
        raise TunesmithError(f"--objective {objective} is not one of {', '.join(OBJECTIVES)}")
    recipe = load_recipe(recipe_path)
    check_objective(recipe, objective, recipe_path)
    base = yaml.safe_load(recipe_to_yaml(recipe))
    dimensions = read_space(space_path, base)
    out = Path(out) if out else Path(str(Path(recipe.output.dir)) + "-sweep")
    out.mkdir(parents=True, exist_ok=True)
    for dimension in dimensions:  # every bound must make a valid recipe, before any trial runs
        for value in (dimension.choices or (dimension.low, dimension.high)):
            validate_recipe(trial_recipe(base, {dimension.path: value}, out / "check"), source=f"{space_path} "
                            f"({dimension.path}={value})")
    storage = storage or f"sqlite:///{out / 'study.db'}"
    study = open_study(storage, objective, recipe.train.seed, pruning, heartbeat)
    if not study.trials:
        defaults = {d.path: recipe_value(base, d.path) for d in dimensions}
        study.enqueue_trial({k: v for k, v in defaults.items() if within(dimension_of(dimensions, k), v)})
    say(f"study {storage}: {len(finished_trials(study))} trials done, {max(0, trials - len(finished_trials(study)))} "
        f"to run" + (f" by {workers} workers" if workers > 1 else ""))
    task = SweepTask(str(recipe_path), base, dimensions, out, objective, storage, trials, recipe.train.seed, pruning,
                     heartbeat, workers)
    others = start_workers(task, workers - 1)
    try:
        work(task, say)
    except KeyboardInterrupt:
        stop_workers(others)
        done = len(finished_trials(study))
        raise TunesmithError(f"sweep interrupted after {done} finished trials; the study is kept in {storage}: "
                             "run the same command to continue") from None
    for process in others:
        process.join()
    return write_outputs(open_study(storage, objective, recipe.train.seed, pruning, heartbeat), out, objective, recipe)


@dataclass(frozen=True)
class SweepTask:
    """What every worker of one sweep needs (picklable: workers are separate processes)."""

    recipe_path: str
    base: dict
    dimensions: list[Dimension]
    out: Path
    objective: str
    storage: str
    trials: int
    seed: int
    pruning: bool
    heartbeat: int
    workers: int


def open_study(storage: str, objective: str, seed: int, pruning: bool, heartbeat: int):
    """The study in ``storage`` (created on first use), with heartbeats so a killed worker's trial is found.

    A worker writes a heartbeat every ``heartbeat`` seconds while it runs a trial; a trial whose heartbeat
    is older than three of them is marked failed by the next worker that looks, and Optuna's
    ``RetryFailedTrialCallback`` queues its parameters again (once), so no trial is lost.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():  # heartbeats and the retry callback are marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            rdb = optuna.storages.RDBStorage(
                storage, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                failed_trial_callback=optuna.storages.RetryFailedTrialCallback(max_retry=1))
        except (ImportError, ValueError) as error:
            raise TunesmithError(f"--storage {storage} cannot be opened ({type(error).__name__}: {error}); give "
                                 "sqlite:///FILE or postgresql://USER@HOST:PORT/DATABASE") from None
        except Exception as error:  # the database driver's own errors (refused connection, unknown database)
            raise TunesmithError(f"--storage {storage} cannot be reached ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0]})") from None
    return optuna.create_study(
        study_name="tunesmith", storage=rdb, load_if_exists=True,
        direction="minimize" if objective == "val_loss" else "maximize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2) if pruning else optuna.pruners.NopPruner())


def finished_trials(study) -> list:
    """Trials that count toward ``--trials``: complete, pruned, or failed for good (not retried by a worker)."""
    trials = study.get_trials(deepcopy=False)
    retried = set(retries(trials))
    return [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")
            or (t.state.name == "FAIL" and t.number not in retried)]


def retries(trials) -> dict[int, int]:
    """``{number of a trial whose worker stopped: number of the trial that ran its parameters again}``."""
    import optuna
    from optuna.storages import RetryFailedTrialCallback

    with warnings.catch_warnings():  # marked experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        found = {RetryFailedTrialCallback.retried_trial_number(t): t.number for t in trials}
    found.pop(None, None)
    return found


def work(task: SweepTask, say=print) -> None:
    """One worker: run trials of the shared study until ``task.trials`` have finished.

    Every worker, on every machine, runs this same loop against the same storage. Before each trial it
    fails the stale trials of killed workers (queuing their parameters again), and it starts a trial only
    while finished + running trials fall short of the target, else waits for the running ones to end, so a
    trial is neither run twice nor lost.
    """
    import time

    import optuna

    study = open_study(task.storage, task.objective, worker_seed(task), task.pruning, task.heartbeat)
    while True:
        optuna.storages.fail_stale_trials(study)
        finished = len(finished_trials(study))
        if finished >= task.trials:
            return
        states = [t.state.name for t in study.get_trials(deepcopy=False)]
        if finished + states.count("RUNNING") >= task.trials and "WAITING" not in states:
            time.sleep(task.heartbeat)  # the last trials run elsewhere; wait to see them end (or go stale)
            continue
        study.optimize(lambda trial: run_trial(trial, task.base, task.dimensions, task.out, task.objective, say),
                       n_trials=1, catch=(TunesmithError,))


def worker_seed(task: SweepTask) -> int:
    """The sampler's seed in this process: the recipe's seed for a lone worker (a sweep that repeats exactly);
    mixed with the host and process when several share the study, so no two suggest the same parameters."""
    import hashlib
    import os
    import socket

    if task.workers == 1 and task.storage == f"sqlite:///{task.out / 'study.db'}":
        return task.seed
    mixed = hashlib.sha256(f"{task.seed}/{socket.gethostname()}/{os.getpid()}".encode()).digest()
    return int.from_bytes(mixed[:4], "little")


def worker_main(task: SweepTask, index: int) -> None:
    """Entry point of a worker process started by :func:`start_workers`."""

    configure_threads()
    try:
        work(task, say=lambda text: print(f"worker {index}: {text}", flush=True))
    except KeyboardInterrupt:
        pass


def start_workers(task: SweepTask, count: int) -> list:
    """``count`` more worker processes on this machine (spawned: each its own interpreter and torch)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker_main, args=(task, index + 1), daemon=False) for index in range(count)]
    for process in processes:
        process.start()
    return processes


def stop_workers(processes: list) -> None:
    for process in processes:
        process.terminate()
    for process in processes:
        process.join()


def dimension_of(dimensions: list[Dimension], path: str) -> Dimension:
    return next(d for d in dimensions if d.path == path)


def within(dimension: Dimension, value) -> bool:
    """Whether the recipe's own value lies in the space (then trial 0 uses it)."""
    if value is None:
        return False
    if dimension.choices is not None:
        return value in dimension.choices
    return isinstance(value, (int, float)) and dimension.low <= value <= dimension.high


def check_objective(recipe: Recipe, objective: str, source) -> None:
    has_validation = recipe.data.validation is not None or recipe.data.validation_fraction > 0 or any(
        getattr(s, "validation", None) for s in recipe.data.sources)
    if objective == "val_loss" and not has_validation:
        raise TunesmithError(f"{source}: the val_loss objective needs validation data; set data.validation or "
                             "data.validation_fraction")
    if objective == "task" and recipe.eval.task is None:
        raise TunesmithError(f"{source}: the task objective needs eval.task (a file of prompts and answers)")


def recipe_value(raw: dict, path: str):
    node = raw
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def run_trial(trial, base: dict, dimensions: list[Dimension], out: Path, objective: str, say) -> float:
    """One normal run with the trial's parameters; its objective value."""
    params = {d.path: d.suggest(trial) for d in dimensions}
    folder = out / f"trial-{trial.number:03d}"
    recipe = validate_recipe(trial_recipe(base, params, folder), source=f"trial {trial.number}")
    say(f"trial {trial.number}: " + ", ".join(f"{k}={v}" for k, v in params.items()))
    trial.set_user_attr("run_dir", str(folder))
    hooks = [PruningHook(trial)] if objective == "val_loss" else []
    try:
        summary = finetune(recipe, extra_hooks=hooks + [TrialProgress(trial.number, say)], progress=False, recipe_path=str(RunLayout(folder).config))
    except Interrupted:
        raise KeyboardInterrupt from None  # Ctrl-C stops the sweep, not just this trial
    if hooks and hooks[0].pruned:
        import optuna

        raise optuna.TrialPruned(hooks[0].pruned)  # after the run finished: its folder is kept whole
    value = summary.objective(objective)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise TunesmithError(f"trial {trial.number} gave no {objective}")
    trial.set_user_attr("tokens_per_s", summary.tokens_per_s)
    return float(value)


def write_outputs(study, out: Path, objective: str, recipe: Recipe) -> SweepResult:
    """``trials.md``, ``sweep.png`` and ``best.yaml``, each written whole (temporary name, then rename)."""
    retried = retries(study.trials)
    rows = [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params,
             "run_dir": t.user_attrs.get("run_dir", ""), "retried_as": retried.get(t.number),
             "last_step": max(t.intermediate_values) if t.intermediate_values else None} for t in study.trials]
    write_text_atomic(out / "trials.md", markdown_table(rows, objective) + "\n")
    plot(rows, objective, out / "sweep.png")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    if not complete:
        return SweepResult(out, objective, rows, None, None)
    best = study.best_trial
    best_raw = yaml.safe_load(RunLayout(Path(best.user_attrs["run_dir"])).config.read_text())
    best_raw["output"] = {**best_raw["output"], "dir": str(out / "best"), "overwrite": False}
    best_path = out / "best.yaml"
    text = (f"# tunesmith train {best_path}\n# best of {len(study.trials)} trials of {out / 'study.db'}: trial "
            f"{best.number}, {objective} {best.value:.4f}\n" + recipe_to_yaml(validate_recipe(best_raw)))
    write_text_atomic(best_path, text)
    return SweepResult(out, objective, rows, next(r for r in rows if r["number"] == best.number), best_path)


def markdown_table(rows: list[dict], objective: str) -> str:
    names = sorted({k for r in rows for k in r["params"]})
    lines = ["| trial | state | " + objective + " | " + " | ".join(names) + " | run |",
             "|---|---|---|" + "---|" * len(names) + "---|"]
    for r in rows:
        value = f"{r['value']:.4f}" if r["value"] is not None else ""
        if r["state"] == "pruned":
            value = f"pruned at step {r['last_step']}" + (f" ({value})" if value else "")
        if r.get("retried_as") is not None:
            value = f"its worker stopped; run again as trial {r['retried_as']}"
        cells = [format_value(r["params"].get(n)) for n in names]
        lines.append(f"| {r['number']} | {r['state']} | {value} | " + " | ".join(cells) + f" | {r['run_dir']} |")
    return "\n".join(lines)


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return "" if value is None else str(value)


def plot(rows: list[dict], objective: str, path: Path) -> None:
    """Objective per trial (pruned trials marked) and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["value"] is not None]
    figure, axes = plt.subplots(figsize=(6, 3.5))
    if done:
        best, best_so_far = None, []
        for r in done:
            better = best is None or (r["value"] < best if objective == "val_loss" else r["value"] > best)
            best = r["value"] if better else best
            best_so_far.append(best)
        axes.plot([r["number"] for r in done], [r["value"] for r in done], "o", label="trial")
        axes.step([r["number"] for r in done], best_so_far, where="post", label="best so far")
    pruned = [r["number"] for r in rows if r["state"] == "pruned"]
    for number in pruned:
        axes.axvline(number, color="grey", alpha=0.3, linestyle=":")
    axes.set_xlabel("trial (dotted lines: pruned)")
    axes.set_ylabel(objective)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as partial:
        figure.savefig(partial, dpi=100, format="png")
    plt.close(figure)
