"""MLflow for the experiments, optional: a harness logs only when mlflow is importable and a
tracking URI is given (--tracking-uri or $MLFLOW_TRACKING_URI); otherwise it runs all the same,
prints its figures, and says once on stderr that it is not logging.

mlflow is imported inside the functions, so this module (and the experiments) import on a bare
GPU machine. The MLflow helpers that need no orchestration live here, and flows.tracking uses
them too: one experiment layout, one git tag, one way to log params, figures and epochs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae_core import figure_names
from vae_core.errors import VaeError

if TYPE_CHECKING:
    from mlflow.data.dataset import Dataset
    from mlflow.tracking import MlflowClient

ENV_URI = "MLFLOW_TRACKING_URI"
ARTIFACT_ROOT = "mlruns"
# MLflow's UI opens an experiment by its kind; this one is model training, not GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


class TrackingUnavailable(VaeError, RuntimeError):
    """The MLflow tracking backend does not answer."""


def git_state(workdir: Path) -> dict[str, str]:
    """The commit the code came from and whether the tree had uncommitted changes; "unknown"
    where there is no `git` or no repository (a working tree copied to a GPU machine)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=workdir, capture_output=True, text=True)
        except OSError:  # no git on this machine, or no such folder
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git.commit": commit or "unknown",
        "git.dirty": "unknown" if status is None else str(bool(status)).lower(),
    }


def ensure_reachable(client: MlflowClient) -> None:
    """Fail fast, with the URI in the message, when the tracking backend does not answer."""
    from mlflow.exceptions import MlflowException

    try:
        client.search_experiments(max_results=1)
    except (MlflowException, OSError) as exc:
        raise TrackingUnavailable(
            f"MLflow tracking backend {client.tracking_uri} is unreachable: {exc}"
        ) from exc


def experiment_name(dataset: str) -> str:
    return f"vae-{dataset}"


def ensure_experiment(client: MlflowClient, dataset: str, workdir: Path) -> str:
    """One experiment per dataset, marked as model training so the UI opens on its runs; with a
    local backend its artifacts live under ./mlruns."""
    name = experiment_name(dataset)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:  # made by an older version
            client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return found.experiment_id
    local = client.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in client.tracking_uri
    location = (Path(workdir).resolve() / ARTIFACT_ROOT).as_uri() if local else None
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    )


def log_params(client: MlflowClient, run_id: str, flat_params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in sorted(flat_params.items())]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i : i + 100])


def log_figures(
    client: MlflowClient,
    run_id: str,
    figures: Mapping[str, float],
    step: int = 0,
    *,
    model_id: str | None = None,
    dataset: Dataset | None = None,
) -> None:
    """Figures (already under their MLflow names) as metrics, in one batch. With ``model_id``
    they are the logged model's metrics too (MLflow 3: the experiment's Models tab and
    `mlflow.search_logged_models`), measured on ``dataset`` when given."""
    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    on = {"dataset_name": dataset.name, "dataset_digest": dataset.digest} if dataset else {}
    batch = [Metric(k, float(v), stamp, step, model_id=model_id, **on) for k, v in figures.items()]
    for i in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[i : i + 1000])


class EpochLogger:
    """Trainer callback: each epoch's figures to MLflow (vae_core.figure_names' names, step =
    epoch). `skip`: history keys not to log (figure_names.repeated_epoch_keys)."""

    def __init__(self, client: MlflowClient, run_id: str, skip: frozenset[str] = frozenset()):
        self.client, self.run_id, self.skip = client, run_id, skip

    def __call__(self, metrics: dict) -> None:
        log_figures(
            self.client,
            self.run_id,
            figure_names.epoch_figures(metrics, self.skip),
            step=int(metrics["epoch"]),
        )


# --------------------------------------------------------------------------- optional logging


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Run:
    """One MLflow run of an experiment, or none (``client`` None): every call is then a no-op,
    so a harness has one code path whether it logs or not."""

    client: MlflowClient | None = None
    run_id: str = ""

    def log_params(self, params: dict[str, Any]) -> None:
        if self.client is not None:
            log_params(self.client, self.run_id, params)

    def log_figures(self, figures: Mapping[str, float]) -> None:
        if self.client is not None:
            log_figures(self.client, self.run_id, figures)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        if self.client is not None:
            for key, value in tags.items():
                self.client.set_tag(self.run_id, key, value)

    def epoch_callbacks(self, skip: frozenset[str]) -> list[Callable[[dict], None]]:
        """The trainer callbacks that log each epoch (none without MLflow)."""
        return [] if self.client is None else [EpochLogger(self.client, self.run_id, skip)]


@dataclass(frozen=True)
class Tracker:
    """Where an experiment's runs go: an MLflow client and experiment, or nowhere."""

    client: MlflowClient | None = None
    experiment_id: str = ""

    @contextmanager
    def run(self, name: str, tags: Mapping[str, str]) -> Iterator[Run]:
        """A run named ``name`` with ``tags``: FINISHED when the block ends, FAILED with
        `failure.reason` when it raises (best effort: the backend may be what failed); the
        exception propagates."""
        if self.client is None:
            yield Run()
            return
        run = self.client.create_run(self.experiment_id, tags=dict(tags), run_name=name)
        run_id = run.info.run_id
        try:
            yield Run(self.client, run_id)
        except BaseException as exc:
            with suppress(Exception):
                reason = f"{type(exc).__name__}: {exc}"
                self.client.set_tag(run_id, "failure.reason", reason[:5000])
                self.client.set_terminated(run_id, "FAILED", end_time=int(time.time() * 1000))
            raise
        self.client.set_terminated(run_id, "FINISHED", end_time=int(time.time() * 1000))


def open_tracker(
    uri: str | None, experiment: str, workdir: Path, say: Callable[[str], None] = _say
) -> Tracker:
    """The tracker of experiment ``vae-<experiment>`` at ``uri`` (default $MLFLOW_TRACKING_URI),
    reachable or TrackingUnavailable; a tracker that logs nothing, said once through ``say``,
    when no URI is given or mlflow is not installed."""
    uri = uri or os.environ.get(ENV_URI)
    if not uri:
        say("not logging to MLflow: no tracking URI (--tracking-uri or $MLFLOW_TRACKING_URI)")
        return Tracker()
    try:
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        say(f"not logging to MLflow ({uri}): mlflow is not importable ({exc})")
        return Tracker()
    client = MlflowClient(uri)
    ensure_reachable(client)
    return Tracker(client, ensure_experiment(client, experiment, workdir))
