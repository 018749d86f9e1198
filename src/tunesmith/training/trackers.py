"""Experiment trackers: TensorBoard, Weights & Biases, MLflow and Trackio, behind one hook.

Each tracker gets the resolved recipe as the run's config, every logged record (training steps,
validation), and at the end the summary (with the task metric before and after) and the result folder
as an artifact where the tracker keeps artifacts. A tracker that fails never fails the training: the
first error is reported once as a warning and that tracker is dropped; the run goes on.

Every tracker writes locally by default, inside the run folder, so nothing leaves the machine unless the
recipe says so: W&B in offline mode (``OUTPUT/wandb/``, uploadable later with ``wandb sync``), MLflow
into a SQLite store and artifact folder (``OUTPUT/mlflow/``) unless ``output.tracking.mlflow_uri`` names
a server, Trackio into ``OUTPUT/trackio/``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Optional

from tunesmith.core.registry import Registry
from tunesmith.training.hooks import Hook

logger = logging.getLogger(__name__)


class Tracker:
    """One experiment tracker. Subclasses import their library lazily (each is an optional extra)."""

    def __init__(self, out: Path, project: str, run_name: str, settings) -> None:
        self.out, self.project, self.run_name, self.settings = out, project, run_name, settings

    def start(self, config: dict[str, Any]) -> None: ...

    def log(self, values: dict[str, float], step: int) -> None: ...

    def finish(self, summary: dict[str, float], artifact: Optional[Path]) -> None: ...

    def location(self) -> str:
        """Where this run's entry is (a folder, a run id, a URI), for the summary and the studio."""
        return ""


TRACKERS: Registry[type[Tracker]] = Registry("tracker")


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """Event files in ``OUTPUT/tensorboard`` (needs the tensorboard package)."""

    def start(self, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.out / "tensorboard"))

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict[str, float], artifact: Optional[Path]) -> None:
        for key, value in summary.items():
            self.writer.add_scalar(f"summary/{key}", value, 0)
        self.writer.close()

    def location(self) -> str:
        return str(self.out / "tensorboard")


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """A W&B run (offline by default: a local run folder that ``wandb sync`` uploads)."""

    def start(self, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=self.project, name=self.run_name, config=config, dir=str(self.out),
                              mode=self.settings.wandb_mode, reinit="create_new")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, float], artifact: Optional[Path]) -> None:
        import wandb

        for key, value in summary.items():
            self.run.summary[key] = value
        if artifact is not None and artifact.is_dir():
            model = wandb.Artifact(f"{self.run_name}-result", type="model")
            model.add_dir(str(artifact))
            self.run.log_artifact(model)
        self.run.finish()

    def location(self) -> str:
        return str(Path(self.run.dir).parent)


@TRACKERS.register("mlflow")
class MlflowTracker(Tracker):
    """An MLflow run, by default in a SQLite store with an artifact folder under ``OUTPUT/mlflow``."""

    def start(self, config: dict[str, Any]) -> None:
        from mlflow.tracking import MlflowClient

        folder = self.out / "mlflow"
        folder.mkdir(exist_ok=True)
        self.uri = self.settings.mlflow_uri or f"sqlite:///{folder.resolve() / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self.client.get_experiment_by_name(self.project)
        experiment_id = (experiment.experiment_id if experiment is not None else self.client.create_experiment(
            self.project, artifact_location=None if self.settings.mlflow_uri else (folder / "artifacts").resolve().as_uri()))
        self.run_id = self.client.create_run(experiment_id, run_name=self.run_name).info.run_id
        for key, value in flatten_config(config).items():
            self.client.log_param(self.run_id, key, str(value)[:500])  # MLflow caps a parameter value's length

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.client.log_metric(self.run_id, key.replace("@", "_at_"), value, step=step)

    def finish(self, summary: dict[str, float], artifact: Optional[Path]) -> None:
        for key, value in summary.items():
            self.client.log_metric(self.run_id, f"summary.{key}", value)
        if artifact is not None and artifact.is_dir():
            self.client.log_artifacts(self.run_id, str(artifact), artifact_path=artifact.name)
        self.client.set_terminated(self.run_id)

    def location(self) -> str:
        return f"{self.uri} run {self.run_id}"


@TRACKERS.register("trackio")
class TrackioTracker(Tracker):
    """A Trackio run in Trackio's own local store (its default folder, or ``TRACKIO_DIR`` where the user set it)."""

    def start(self, config: dict[str, Any]) -> None:
        import trackio

        self.run = trackio.init(project=self.project, name=self.run_name, config=config, embed=False,
                                auto_log_cpu=False, auto_log_gpu=False)

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def finish(self, summary: dict[str, float], artifact: Optional[Path]) -> None:
        self.run.log({f"summary/{key}": value for key, value in summary.items()})
        self.run.finish()

    def location(self) -> str:
        from trackio.utils import TRACKIO_DIR

        return f"{TRACKIO_DIR} project {self.project}"


def flatten_config(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (MLflow's parameters are flat)."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        flat.update(flatten_config(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def numbers(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a (nested) record, flat: what every tracker can plot."""
    values: dict[str, float] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            values.update(numbers(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values[f"{prefix}{key}"] = float(value)
    return values


class Trackers(Hook):
    """The run's trackers as one hook; a failing tracker is dropped with one warning, never failing the run.

    Args:
        names: Tracker names (``output.trackers``), each registered in :data:`TRACKERS`.
        out: The run folder.
        config: The resolved recipe (the run's config in every tracker).
        settings: ``output.tracking`` (project, run name, W&B mode, MLflow URI).
    """

    def __init__(self, names, out: Path, config: dict[str, Any], settings) -> None:
        run_name = settings.run_name or Path(out).resolve().name
        self.trackers = {name: TRACKERS.get(name)(Path(out), settings.project, run_name, settings) for name in names}
        self.config = config

    def _each(self, action: str, *args) -> None:
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, action)(*args)
            except Exception as error:  # a tracker never fails the training: say it once, drop it
                logger.warning("tracker %s failed (%s: %s); training goes on without it", name,
                               type(error).__name__, error)
                del self.trackers[name]

    def on_train_start(self, total_steps: int, start_step: int) -> None:
        self._each("start", self.config)

    def on_log(self, record: dict[str, Any]) -> None:
        values = numbers({key: value for key, value in record.items() if key != "step"})
        if values:
            self._each("log", values, int(record["step"]))

    def locations(self) -> dict[str, str]:
        """Where each tracker keeps this run's entry (after training started), for the summary and the studio."""
        return {name: tracker.location() for name, tracker in self.trackers.items()}

    def close(self, summary: dict[str, Any], artifact: Optional[Path]) -> None:
        """Send the summary (task metric before/after included) and the result; finish every tracker."""
        flat = numbers({key: value for key, value in summary.items() if key not in ("data", "validation")})
        self._each("finish", flat, artifact)
