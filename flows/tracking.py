"""MLflow tracking: where runs go, what lineage they carry, and what gets logged.

Tasks log through an explicit run id (MlflowClient), never through a run that must stay
"active" across tasks, so the flow works whatever thread Prefect runs a task in.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

# The MLflow helpers that need no orchestration live in experiments.tracking (MLflow optional
# there, so the experiments run on a bare GPU machine); the flows use them through this module.
from experiments.tracking import ENV_URI, TrackingUnavailable, git_state, log_figures
from experiments.tracking import EpochLogger as EpochLogger
from experiments.tracking import ensure_experiment as ensure_experiment
from experiments.tracking import ensure_reachable as ensure_reachable
from experiments.tracking import log_params as log_params
from flows import run_record
from flows.lineage import model_code_hash
from vae_core.errors import VaeError

if TYPE_CHECKING:
    from mlflow.data.dataset import Dataset
    from mlflow.data.dataset_source import DatasetSource
    from mlflow.data.meta_dataset import MetaDataset

    from flows.params import Params

DEFAULT_DB = "mlflow.db"
# Training images: IMAGE_SAMPLES decoded fixed codes and IMAGE_RECONSTRUCTIONS validation
# images, about IMAGE_STEPS times per run.
IMAGE_SAMPLES, IMAGE_RECONSTRUCTIONS, IMAGE_STEPS = 64, 16, 20
UI_URL_ENV, DEFAULT_UI_URL = "MLFLOW_UI_URL", "http://127.0.0.1:5000"


class PermissionRefused(VaeError, PermissionError):
    """The tracking server's auth refused an action to the account this process uses."""


#: MLflow REST endpoint (as named in a refusal) -> (what was refused, the permission it needs).
REFUSED_ACTIONS = {
    "registered-models/alias": ("move an alias of a registered model", "EDIT"),
    "model-versions/delete": ("delete a model version", "MANAGE"),
    "registered-models/delete": ("delete a registered model", "MANAGE"),
    "model-versions/create": ("register a model version", "EDIT"),
    "model-versions/set-tag": ("tag a model version", "EDIT"),
    "registered-models/set-tag": ("tag a registered model", "EDIT"),
    "runs/create": ("create a run in the experiment", "EDIT"),
}


def permission_refusal(exc: Exception) -> PermissionRefused | None:
    """A one-line error naming the account and the permission it lacks, for an MLflow 403."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException) or exc.error_code != "PERMISSION_DENIED":
        return None
    account = os.environ.get("MLFLOW_TRACKING_USERNAME", "(anonymous)")
    endpoint = next((e for e in REFUSED_ACTIONS if f"/{e}" in exc.message), None)
    action, needed = REFUSED_ACTIONS.get(endpoint, ("do this", "a higher permission"))
    return PermissionRefused(
        f"MLflow account {account!r} may not {action}: it needs {needed} permission on that "
        "resource (ask an admin of the tracking server)"
    )


def lost_server(exc: Exception) -> TrackingUnavailable | None:
    """A tracking server that stopped answering mid-run, as one line.

    The policy: MLflow's client retries each request with exponential backoff
    (MLFLOW_HTTP_REQUEST_MAX_RETRIES, default 7, and MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, default
    2: about four minutes), so a server restarted meanwhile is simply waited for; after that the
    run fails with this line. A run that fails before registering registers nothing."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    words = exc.message.split()
    if len(words) < 4 or words[:2] != ["API", "request"] or "failed with" not in exc.message:
        return None
    url = words[3].split("/api/")[0]  # the server, not the endpoint
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    return TrackingUnavailable(
        f"the MLflow tracking server stopped answering ({url}, after {retries} retries); "
        "the run failed before registering anything: run it again once the server is back"
    )


def server_hiccup(exc: BaseException) -> bool:
    """Whether the tracking server, not the work, failed: no answer, a 5xx once MLflow's own
    retries ran out, or a 401 to an account that was let in before (the basic-auth app
    answers 401 while its database restarts). Work that failed this way can resume."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError | requests.exceptions.Timeout):
        return True
    if isinstance(exc, requests.exceptions.HTTPError):
        status = exc.response.status_code if exc.response is not None else 0
        return status == 401 or status >= 500
    return isinstance(exc, Exception) and lost_server(exc) is not None


def retry_on_server_hiccup(task: Any, task_run: Any, state: Any) -> bool:
    """A Prefect retry condition: try again only when the tracking server hiccupped."""
    return server_hiccup(state.result(raise_on_failure=False))


def resolve_uri(workdir: Path) -> str:
    """MLFLOW_TRACKING_URI when the user set it (a server, say), else SQLite in the workspace.

    Resolved once per flow or command and handed to every task as a string."""
    return os.environ.get(ENV_URI) or f"sqlite:///{Path(workdir).resolve() / DEFAULT_DB}"


def connect(uri: str) -> MlflowClient:
    """A client for ``uri``, with MLflow's fluent API pointed there too (model logging, dataset
    inputs and system metrics only exist in the fluent API).

    ``mlflow.set_tracking_uri`` also exports the URI as MLFLOW_TRACKING_URI; the variable is put
    back as it was, so the environment only ever says what the user set, and the next workspace
    in this process resolves to its own database.
    """
    before = os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop(ENV_URI, None)
    else:
        os.environ[ENV_URI] = before
    return MlflowClient(uri)


@contextmanager
def active_run(run_id: str, system_metrics: bool = False) -> Iterator[None]:
    """Make ``run_id`` MLflow's active run for a block, and leave it RUNNING afterwards.

    The run's status is the flow's to set (FINISHED or FAILED at the very end); the fluent
    API's own exit would mark it FINISHED between tasks."""
    mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics)
    try:
        yield
    finally:
        mlflow.end_run(status="RUNNING")


def mark_failed(client: MlflowClient, run_id: str, exc: BaseException | str) -> None:
    """Record why a run failed, mark it FAILED, and delete any model version it registered,
    except one the gate already made champion (or previous champion): that version was fully
    evaluated and gated, and deleting it would leave the model without its champion.

    Best effort: when the failure is the backend itself, these calls fail too, and the
    original error is what the user must see.
    """
    from flows.registry import ALIAS_CHALLENGER

    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    try:
        for mv in client.search_model_versions(f"run_id='{run_id}'"):
            aliases = set(client.get_model_version(mv.name, mv.version).aliases)
            aliases -= {ALIAS_CHALLENGER}
            if aliases:  # the gate already acted on it: deleting it would leave no champion
                note = f"its run failed after the gate gave it {', '.join(sorted(aliases))}"
                client.set_model_version_tag(mv.name, mv.version, "run.failure", note)
                reason += f"; {mv.name} v{mv.version} kept: it holds {', '.join(sorted(aliases))}"
                continue
            client.delete_model_version(mv.name, mv.version)
        client.set_tag(run_id, "failure.reason", reason[:5000])
        client.set_terminated(run_id, "FAILED", end_time=int(time.time() * 1000))
    except Exception:  # noqa: BLE001 - the backend may be the thing that failed
        pass


def mark_interrupted(client: MlflowClient, run_id: str, exc: BaseException) -> None:
    """Record why a run stopped short and mark it KILLED: it can resume, nothing is deleted.

    Best effort, like `mark_failed`: the interruption may be the backend itself."""
    with suppress(Exception):
        client.set_tag(run_id, "interrupted.reason", f"{type(exc).__name__}: {exc}"[:5000])
        client.set_terminated(run_id, "KILLED", end_time=int(time.time() * 1000))


@dataclass
class RunScope:
    """The run a `run_scope` block logs to, and the status a normal exit gives it: FINISHED
    unless the block decides otherwise (FAILED for a sweep with no finished trial)."""

    run_id: str
    end_status: str = "FINISHED"


@contextmanager
def run_scope(
    client: MlflowClient,
    experiment_id: str | None = None,
    *,
    run_name: str | None = None,
    tags: Mapping[str, str] | None = None,
    run_id: str | None = None,
    end_status: str = "FINISHED",
    interrupted: Callable[[BaseException], bool] | None = None,
) -> Iterator[RunScope]:
    """Every MLflow run this project opens, from its start to its status, in one place.

    Creates a run in ``experiment_id`` with ``tags`` (or reopens ``run_id`` as RUNNING, setting
    ``tags`` again) and yields its scope. A normal exit sets ``scope.end_status``: a terminal
    status ends the run; SCHEDULED hands it on (a sweep's child run, which its trial task opens
    again). An exception marks the run FAILED with the reason and deletes any model version it
    registered (`mark_failed`), so a failed run never leaves a half-registered model; where
    ``interrupted(exc)`` says the work can resume instead, the run is KILLED
    (`mark_interrupted`). The exception always propagates."""
    from mlflow.entities import RunStatus, RunTag

    if run_id is None:
        run = client.create_run(experiment_id, tags=dict(tags or {}), run_name=run_name)
        run_id = run.info.run_id
    else:
        client.update_run(run_id, "RUNNING")
        if tags:
            client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])
    scope = RunScope(run_id, end_status)
    try:
        yield scope
    except BaseException as exc:
        if interrupted is not None and interrupted(exc):
            mark_interrupted(client, run_id, exc)
        else:
            mark_failed(client, run_id, exc)
        raise
    if RunStatus.is_terminated(RunStatus.from_string(scope.end_status)):
        client.set_terminated(run_id, scope.end_status, end_time=int(time.time() * 1000))
    else:
        client.update_run(run_id, scope.end_status)


def ui_base(tracking_uri: str) -> str:
    """Where people open the MLflow UI: the tracking server itself (without credentials), or,
    for a local database, MLFLOW_UI_URL (default: the MLflow UI address the README starts)."""
    from urllib.parse import urlsplit, urlunsplit

    if tracking_uri.startswith(("http://", "https://")):
        parts = urlsplit(tracking_uri)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")
    return os.environ.get(UI_URL_ENV, DEFAULT_UI_URL).rstrip("/")


def ui_links(client: MlflowClient, run_id: str, name: str, version: str) -> dict[str, str]:
    """MLflow UI addresses of a run and a model version."""
    base = ui_base(client.tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    view = "?workflowType=machine_learning"  # the UI's model-training view, not GenAI's
    return {
        "base": base,
        "run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}{view}",
        "version": f"{base}/#/models/{name}/versions/{version}{view}",
    }


def artifact_url(base: str, run_id: str, path: str) -> str:
    """The MLflow server's address of one run artifact (what its UI loads images from)."""
    from urllib.parse import urlencode

    return f"{base}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id})}"


def prefect_context() -> dict[str, str]:
    """The Prefect flow run (and deployment, when scheduled) that is doing the work."""
    from prefect import runtime

    tags = {
        "prefect.flow_run_id": str(runtime.flow_run.id or ""),
        "prefect.flow_run_name": str(runtime.flow_run.name or ""),
    }
    if runtime.deployment.id:
        tags["prefect.deployment"] = str(runtime.deployment.name)
    return tags


def prefect_actor() -> str:
    """Who is acting, for the alias history: the flow run, and its deployment if scheduled."""
    context = prefect_context()
    actor = (
        f"prefect flow run {context['prefect.flow_run_name']} ({context['prefect.flow_run_id']})"
    )
    if "prefect.deployment" in context:
        actor += f", deployment {context['prefect.deployment']}"
    return actor


def lineage_tags(params: Params, lineage: dict, workdir: Path, device: str) -> dict[str, str]:
    import torch

    return {
        **git_state(workdir),
        "dvc.raw_md5": lineage["raw_md5"],
        "dvc.processed_md5": lineage["processed_md5"],
        "data.counts": json.dumps(lineage.get("counts"), sort_keys=True),
        "params.hash": params.hash(),
        "code.hash": model_code_hash(),
        "workspace": f"{platform.node()}:{Path(workdir).resolve()}",  # which clone, which host
        "data.dataset": params.data.dataset,
        "data.source": params.data.source,
        "device": device,
        "torch.version": torch.__version__,
        "python.version": platform.python_version(),
        **prefect_context(),
    }


class ImageLogger:
    """Trainer callback: a sample grid (fixed z) and reconstructions (fixed validation
    images) as MLflow images every `every` epochs, step = epoch, so the UI shows how a run's
    samples improve and sets runs' samples side by side."""

    def __init__(
        self,
        client: MlflowClient,
        run_id: str,
        model: Any,
        val_images: Any,
        every: int,
        seed: int = 0,
    ):
        import torch

        self.client, self.run_id, self.model, self.every = client, run_id, model, max(1, every)
        gen = torch.Generator().manual_seed(seed)
        self.z = torch.randn(IMAGE_SAMPLES, model.latent_dim, generator=gen)
        self.val_images = val_images[:IMAGE_RECONSTRUCTIONS]
        self.logged: set[int] = set()

    @staticmethod
    def interval(epochs: int) -> int:
        """About IMAGE_STEPS images per key over a full run."""
        return max(1, round(epochs / IMAGE_STEPS))

    def __call__(self, metrics: dict) -> None:
        epoch = int(metrics["epoch"])
        if epoch == 1 or epoch % self.every == 0:
            self.log(epoch)

    def log(self, step: int) -> None:
        """Log both grids at `step` (once per step)."""
        from vae_core.evaluation.images import decoded_grid, grid_image, reconstruction_rows

        if step in self.logged:
            return
        was_training = self.model.training
        self.model.eval()
        try:
            samples = decoded_grid(self.model, self.z).numpy()
            recon = grid_image(reconstruction_rows(self.model, self.val_images)).numpy()
        finally:
            self.model.train(was_training)
        self.client.log_image(self.run_id, samples, key="samples", step=step)
        self.client.log_image(self.run_id, recon, key="reconstructions", step=step)
        self.logged.add(step)


def set_description(client: MlflowClient, run_id: str, markdown: str) -> None:
    """The run's description in the MLflow UI (rendered as Markdown)."""
    client.set_tag(run_id, "mlflow.note.content", markdown)


def loss_curve(history: list[dict]):
    """A matplotlib figure of the train and validation figures per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [h["epoch"] for h in history]
    # Under the iwae objective (k > 1) the trainer's train figure is the -IWAE bound, and the
    # validation -IWAE bound is what chooses the weights.
    iwae = bool(history) and "val_neg_iwae" in history[0]
    train_label = "train -IWAE bound" if iwae else "train -ELBO"
    ax.plot(epochs, [h["train_neg_elbo"] for h in history], marker="o", label=train_label)
    ax.plot(epochs, [h["val_neg_elbo"] for h in history], marker="o", label="validation -ELBO")
    if iwae:
        bound = [h["val_neg_iwae"] for h in history]
        ax.plot(epochs, bound, marker="o", label="validation -IWAE bound")
    ax.set_xlabel("epoch")
    ax.set_ylabel("nats per image")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _local_source(folder: Path) -> DatasetSource:
    """A folder on this machine as an MLflow dataset source, named as MLflow's "local" source
    type: resolving a bare path would match two registered local sources and warn."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json

    uri = str(Path(folder).resolve())
    return get_dataset_source_from_json(json.dumps({"uri": uri}), source_type="local")


def _log_inputs(client: MlflowClient, run_id: str, datasets: list[Dataset], context: str) -> None:
    """Datasets as the run's inputs, tagged with MLflow's context tag (training, evaluation)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    tags = [InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)]
    # What mlflow.log_input sends, through the client: no active run needed.
    inputs = [DatasetInput(dataset=ds._to_mlflow_entity(), tags=tags) for ds in datasets]
    for attempt in range(DATASET_RACE_ATTEMPTS):
        try:
            client.log_inputs(run_id, datasets=inputs)
            return
        except MlflowException as exc:
            if attempt == DATASET_RACE_ATTEMPTS - 1 or not lost_dataset_race(exc):
                raise


DATASET_RACE_ATTEMPTS = 3


def lost_dataset_race(exc: Exception) -> bool:
    """Two runs logged the same new dataset at once (a sweep's parallel trials evaluating on one
    split): MLflow's store looks for the dataset, then inserts it, so the later insert breaks
    the unique key (SQLite's UNIQUE, PostgreSQL's duplicate key) and its transaction is rolled
    back. The dataset exists now, so logging again links it."""
    text = str(exc)
    return "dataset" in text and ("UNIQUE constraint failed" in text or "duplicate key" in text)


def log_dataset(
    client: MlflowClient, run_id: str, lineage: dict, processed_dir: Path, dataset: str
) -> None:
    """The processed data as the run's training input, whose digest is DVC's md5."""
    from mlflow.data.meta_dataset import MetaDataset

    source = _local_source(processed_dir)
    ds = MetaDataset(source, name=f"{dataset}-processed", digest=lineage["processed_md5"])
    _log_inputs(client, run_id, [ds], "training")


def split_dataset(processed_dir: Path, dataset: str, split: str) -> MetaDataset:
    """One split of the processed data (``<dataset>-test``, ``<dataset>-holdout``) as an MLflow
    dataset whose digest is the md5 of that split's files: equal digests, equal examples."""
    from mlflow.data.meta_dataset import MetaDataset

    from vae_core.data.splits import ARRAY_FILES

    digest = hashlib.md5(usedforsecurity=False)
    for name in ARRAY_FILES:
        if name.startswith(f"{split}_"):
            digest.update(name.encode() + b"\0")
            digest.update((Path(processed_dir) / f"{name}.npy").read_bytes())
    source = _local_source(processed_dir)
    return MetaDataset(source, name=f"{dataset}-{split}", digest=digest.hexdigest())


def log_evaluation(
    client: MlflowClient,
    run_id: str,
    figures: Mapping[str, float],
    *,
    model_id: str,
    processed_dir: Path,
    dataset: str,
) -> None:
    """The evaluation's figures as metrics of the run and of the logged model, each linked to
    the split it was measured on, and those splits as the run's evaluation inputs."""
    by_split: dict[str | None, dict[str, float]] = {}
    for name, value in figures.items():
        by_split.setdefault(run_record.evaluated_on(name), {})[name] = value
    splits = {s: split_dataset(processed_dir, dataset, s) for s in by_split if s is not None}
    if splits:
        _log_inputs(client, run_id, list(splits.values()), "evaluation")
    for split, group in by_split.items():
        log_figures(client, run_id, group, model_id=model_id, dataset=splits.get(split))
