"""The `training-pipeline` Prefect flow: fetch -> prepare (DVC) -> train -> evaluate ->
register -> promote, with one MLflow run per flow run.

Tasks pass paths, hashes, the frozen params and small dicts of figures, never tensors; the
MLflow run is addressed by its id through one client. The workspace lock makes a second run
started at the same moment wait for the first, so params.yaml, dvc.lock, data/ and the
registry are only ever changed by one run at a time.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.task_engine import TaskRunTimeoutError
from prefect.utilities.timeout import timeout

from flows import dvc_runner, run_record, scoring, tracking, workspace
from flows.lineage import data_lineage
from flows.params import LimitsConfig, Params, load_params
from flows.recovery import settle_dead_run
from vae_core import figure_names
from vae_core.errors import VaeError


@task(**dvc_runner.FETCH_RETRY)
def fetch_data(workdir: str) -> str:
    """`dvc repro fetch` (with the source fingerprint before it). The one retry layer of a
    download: a source that could not be reached is retried (params.yaml's fetch section, see
    `refresh_data`), bad input is not."""
    log = dvc_runner.repro("fetch", cwd=Path(workdir))
    get_run_logger().info("dvc repro fetch ran: %s", ", ".join(dvc_runner.stages_run(log)))
    return log


@task
def prepare_data(workdir: str, dataset: str) -> dict:
    """`dvc repro` for the remaining stages; returns the lineage read back from dvc.lock."""
    log = dvc_runner.repro(cwd=Path(workdir))
    get_run_logger().info("dvc repro ran: %s", ", ".join(dvc_runner.stages_run(log)) or "nothing")
    return {"dvc_log": log, **data_lineage(workdir, dataset)}


@task(retries=2, retry_delay_seconds=10)
def pull_data(workdir: str, remote: str) -> str:
    """Bring what another workspace already prepared from the team's DVC remote, so that
    `dvc repro` re-runs only what it lacks."""
    line = dvc_runner.last_line(dvc_runner.pull(remote, cwd=Path(workdir)))
    get_run_logger().info("dvc pull -r %s: %s", remote, line)
    return line


@task(retries=2, retry_delay_seconds=10)
def push_data(workdir: str, remote: str) -> str:
    """Send this workspace's stage outputs to the team's DVC remote."""
    line = dvc_runner.last_line(dvc_runner.push(remote, cwd=Path(workdir)))
    get_run_logger().info("dvc push -r %s: %s", remote, line)
    return line


def refresh_data(root: Path, params: Params, dvc_remote: str | None) -> dict:
    """The data steps of a pipeline run or a sweep: pull from the team's remote (if any), run
    the stages that changed, retrying a source that could not be reached as params.yaml's fetch
    section says, push the results back; returns the lineage."""
    if dvc_remote:
        pull_data(str(root), dvc_remote)
    fetch_data.with_options(**dvc_runner.fetch_retry(params.fetch))(str(root))
    lineage = prepare_data(str(root), params.data.dataset)
    if dvc_remote:
        push_data(str(root), dvc_remote)
    return lineage


@task
def train_model(workdir: str, params: Params, run_id: str, tracking_uri: str) -> dict:
    """Train in-process, streaming per-epoch figures and sample images to MLflow and a Prefect
    progress bar, then log the model (pickle-free) to the run, ready to register."""
    from flows.model_io import log_vae
    from vae_core.data import load_processed
    from vae_core.training import initial_model, run_training

    logger = get_run_logger()
    client = tracking.connect(tracking_uri)
    root = Path(workdir)
    splits = load_processed(workspace.processed_dir(root, params.data.dataset))
    epochs = params.train.epochs
    progress_id = create_progress_artifact(
        0.0, key="training-progress", description="training epochs done"
    )

    def report(metrics: dict) -> None:
        update_progress_artifact(progress_id, 100.0 * metrics["epoch"] / max(epochs, 1))
        logger.info(
            "epoch %d/%d  train -ELBO %.2f  val -ELBO %.2f  (%.0f images/s)",
            metrics["epoch"],
            epochs,
            metrics["train_neg_elbo"],
            metrics["val_neg_elbo"],
            metrics["samples_per_second"],
        )

    t = params.train
    model = initial_model(params.model, t)
    images = tracking.ImageLogger(
        client,
        run_id,
        model,
        _shown_validation_images(splits, t.data_variant, t.seed),
        every=tracking.ImageLogger.interval(epochs),
        seed=t.seed,
    )
    epoch_logger = tracking.EpochLogger(client, run_id, figure_names.repeated_epoch_keys(t))
    images.log(0)  # the initial weights: MLflow's image cards open on step 0
    out_dir = workspace.run_dir(root, run_id) / "train"
    # The run is active while training, so MLflow samples system metrics meanwhile.
    with tracking.active_run(run_id, system_metrics=True):
        outcome = run_training(
            splits,
            params.model,
            t,
            out_dir,
            callbacks=[epoch_logger, images, report],
            progress=False,
            model=model,
        )
        info = log_vae(outcome.model, t.data_variant, name="model")
    update_progress_artifact(progress_id, 100.0)
    images.log(int(outcome.metrics["best_epoch"]))  # the weights kept: the best epoch's
    if outcome.history:
        client.log_figure(run_id, tracking.loss_curve(outcome.history), "loss_curve.png")
    figures = figure_names.training_figures(outcome.metrics)
    tracking.log_figures(client, run_id, figures, model_id=info.model_id)
    for key, value in figure_names.stop_tags(outcome.metrics).items():
        client.set_tag(run_id, key, value)
    return {
        "model_dir": str(out_dir / "model"),
        "model_uri": info.model_uri,
        "model_id": info.model_id,
        "metrics": outcome.metrics,
        "figures": figures,
    }


def _shown_validation_images(splits: Any, data_variant: str, seed: int) -> Any:
    """The validation images the reconstructions show, as the model sees them (one fixed
    binarization for the binarized variant)."""
    import torch

    from vae_core.training import to_unit_float

    x = to_unit_float(splits.val_images[: tracking.IMAGE_RECONSTRUCTIONS])
    if data_variant == "binarized":
        x = torch.bernoulli(x, generator=torch.Generator().manual_seed(seed))
    return x


@task
def evaluate(
    workdir: str, params: Params, run_id: str, tracking_uri: str, model_dir: str, model_id: str
) -> dict:
    """Likelihood and sample quality into one folder, logged to the run; the figures are the
    logged model's (``model_id``) metrics too, each linked to the split it was measured on."""
    from vae_core.data import load_processed
    from vae_core.evaluation import evaluate_model, load_classifier
    from vae_core.training import load_model, pick_device

    client = tracking.connect(tracking_uri)
    root, dataset = Path(workdir), params.data.dataset
    processed = workspace.processed_dir(root, dataset)
    splits = load_processed(processed)
    classifier_dir = workspace.classifier_dir(root, dataset)
    classifier = load_classifier(classifier_dir) if classifier_dir.is_dir() else None
    out_dir = workspace.run_dir(root, run_id) / "evaluation"
    metrics = evaluate_model(
        load_model(Path(model_dir), device=pick_device(params.train.device)),
        splits,
        params.train.data_variant,
        out_dir,
        params.evaluate,
        classifier=classifier,
    )
    figures = run_record.evaluation_figures(metrics)
    tracking.log_evaluation(
        client, run_id, figures, model_id=model_id, processed_dir=processed, dataset=dataset
    )
    client.log_artifacts(run_id, str(out_dir), "evaluation")
    return {"eval_dir": str(out_dir), "metrics": metrics, "figures": figures}


@task
def register(
    params: Params,
    run_id: str,
    tracking_uri: str,
    model_uri: str,
    tags: dict,
    figures: dict[str, float] | None = None,
) -> dict:
    """Register the run's logged model as a new version aliased `challenger`; its description
    names the run and shows the headline figures."""
    from flows.registry import register_version, registered_model_name

    tracking.connect(tracking_uri)
    name = registered_model_name(params.data.dataset)
    version = register_version(
        run_id,
        name,
        "model",
        tags,
        description=version_description(run_id, tags.get("dvc.processed_md5"), figures or {}),
        model_uri=model_uri,
        actor=tracking.prefect_actor(),
    )
    return {"name": name, "version": str(version.version)}


@task
def promote(
    workdir: str, params: Params, tracking_uri: str, name: str, version: str, eval_dir: str
) -> dict:
    """The gate: the champion scored on the challenger's evaluated examples; aliases by mode."""
    from flows.promotion import gate_and_apply

    client = tracking.connect(tracking_uri)
    processed = workspace.processed_dir(Path(workdir), params.data.dataset)
    actor = tracking.prefect_actor()
    return gate_and_apply(client, name, version, Path(eval_dir), processed, params, actor)


def headline_tags(figures: dict[str, float]) -> dict[str, str]:
    """The figures a registry page shows at a glance, as version tags `metric.<figure>`."""
    return {f"metric.{k}": f"{v:.4f}" for k, v in run_record.headline(figures).items()}


def version_description(run_id: str, data_md5: str | None, figures: dict[str, float]) -> str:
    """A model version's description (Markdown): where it came from and its headline figures."""
    rows = [f"| `{k}` | {v:.2f} |" for k, v in run_record.headline(figures).items()]
    table = ["", "| figure | nats per image |", "| --- | --- |", *rows] if rows else []
    return "\n".join(
        [
            f"Trained by MLflow run `{run_id}` on processed data md5 `{data_md5}`. What each "
            "figure is (data variant, estimator, k): the run's description.",
            *table,
        ]
    )


def _summary(out: dict[str, Any], links: dict[str, str]) -> str:
    """The flow run's summary artifact: the headline figures, with links to MLflow."""
    m, train, reg, gate = out["ev"]["metrics"], out["train"]["metrics"], out["reg"], out["gate"]
    rows = [
        (f"`{k}` (nats per image)", f"{v:.2f}")
        for k, v in run_record.headline(out["figures"]).items()
    ]
    rows += [
        ("data variant", str(m.get("data_variant_label", m.get("data_variant", "?")))),
        ("test NLL estimator", str(m.get("test_nll_iwae_estimator", "not a likelihood"))),
        ("epochs (best)", f"{train['epochs']} ({train['best_epoch']})"),
        ("train images/s", f"{train['train_samples_per_second']:.0f}"),
        ("MLflow run", f"[{out['run_id']}]({links['run']})"),
        ("model version", f"[{reg['name']} v{reg['version']}]({links['version']})"),
        ("promotion", f"{gate.get('decision', '?')}: {gate.get('reason', '')}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# VAE training pipeline\n\n| what | value |\n| --- | --- |\n{table}\n"


def _publish(out: dict[str, Any], client: MlflowClient) -> None:
    """Prefect artifacts of a finished run: the summary table and the evaluation images, which
    the Prefect UI loads from the MLflow server (the link works while the MLflow UI runs)."""
    from prefect.artifacts import create_image_artifact

    reg = out["reg"]
    links = tracking.ui_links(client, out["run_id"], reg["name"], reg["version"])
    create_markdown_artifact(
        _summary(out, links),
        key="training-pipeline-summary",
        description="headline figures, promotion decision, MLflow run and version",
    )
    for name in ("samples", "reconstructions"):
        create_image_artifact(
            image_url=tracking.artifact_url(links["base"], out["run_id"], f"evaluation/{name}.png"),
            key=f"evaluation-{name}",
            description=f"{name}.png of MLflow run {out['run_id']}",
        )


def _train_evaluate_register(
    root: Path,
    params: Params,
    overrides: list[str],
    client: MlflowClient,
    lineage: dict,
    deadline: float | None = None,
) -> dict[str, Any]:
    """One MLflow run: train, evaluate, register, promote. On any failure the run is marked
    FAILED with the reason, and a version it registered is deleted again: a failed run never
    leaves a half-registered model behind."""
    from vae_core.training import pick_device

    uri, dataset = client.tracking_uri, params.data.dataset
    experiment_id = tracking.ensure_experiment(client, dataset, root)
    device = str(pick_device(params.train.device))
    tags = tracking.lineage_tags(params, lineage, root, device)
    with tracking.run_scope(
        client, experiment_id, run_name=tags["prefect.flow_run_name"], tags=tags
    ) as scope:
        run_id = scope.run_id
        workspace.note_holder(root, {"mlflow.run_id": run_id})  # closed by the next run if we die
        tracking.log_params(client, run_id, params.flat())  # overrides applied: one value each
        client.set_tag(run_id, "params.overrides", " ".join(overrides))
        processed = workspace.processed_dir(root, dataset)
        tracking.log_dataset(client, run_id, lineage, processed, dataset)
        limits = params.limits  # each long task's own time limit, within the flow's
        train = train_model.with_options(
            timeout_seconds=task_limit(limits.train_minutes, deadline)
        )(str(root), params, run_id, uri)
        ev = evaluate.with_options(timeout_seconds=task_limit(limits.evaluate_minutes, deadline))(
            str(root), params, run_id, uri, train["model_dir"], train["model_id"]
        )
        figures = train["figures"] | ev["figures"]
        description = run_record.description(train["metrics"], ev["metrics"], figures)
        tracking.set_description(client, run_id, description)
        version_tags = tags | headline_tags(figures) | {"mlflow.run_id": run_id}
        version_tags |= scoring.reference_tags(run_id, ev["metrics"], params.evaluate.iwae_k)
        reg = register(params, run_id, uri, train["model_uri"], version_tags, figures)
        gate = promote(str(root), params, uri, reg["name"], reg["version"], ev["eval_dir"])
        client.set_tag(run_id, "gate.decision", gate.get("decision", ""))
    return {
        "run_id": run_id,
        "train": train,
        "ev": ev,
        "reg": reg,
        "gate": gate,
        "figures": figures,
    }


def _up_to_date(name: str, version: str, match: dict[str, str]) -> dict[str, Any]:
    """The outcome of a run with nothing new to train: it names the version that matches."""
    reason = (
        f"up to date: {name} v{version} was made from the same processed data "
        f"({match['dvc.processed_md5']}), parameters ({match['params.hash']}) and model code "
        f"({match['code.hash']}); nothing trained, nothing registered, no alias moved "
        "(`vae-pipeline run --force` trains anyway)"
    )
    return {
        "run_id": None,
        "model": {"name": name, "version": version},
        "gate": {"decision": "up-to-date", "reason": reason, "applied": False},
        "figures": {},
        "metrics": {},
    }


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(
    overrides: list[str] | None = None,
    workdir: str = ".",
    force: bool = False,
    dvc_remote: str | None = None,
) -> dict[str, Any]:
    """Fetch, prepare, train, evaluate, register and promote one VAE; with nothing changed
    since an existing version (data, parameters, model code), stop and name it instead.

    ``dvc_remote``: a DVC remote the team shares (configured in each workspace, e.g. `dvc
    remote add --local shared PATH`): data come from it when another workspace prepared them,
    and go to it after the stages run."""
    root = Path(workdir).resolve()
    overrides = list(overrides or [])
    limits = load_params(root / workspace.PARAMS_NAME, overrides).limits  # bad values: now
    # Past limits.flow_minutes the body is interrupted like a failure (files restored, the
    # workspace freed, the MLflow run FAILED) and Prefect ends the flow run TimedOut.
    seconds = limits.seconds(limits.flow_minutes)
    deadline = None if seconds is None else time.monotonic() + seconds
    # The long tasks' limits are cut to the deadline (`task_limit`); the flow's own alarm, for
    # work outside them, comes CLEANUP_GRACE_S later, so a task stopped at the deadline can
    # put things back (MLflow, files, lock) before a second interruption could cut that short:
    # two at once left SQLite locked mid-write and the MLflow run RUNNING.
    alarm = None if seconds is None else seconds + CLEANUP_GRACE_S
    try:
        with timeout(alarm, timeout_exc_type=FlowTimeLimit):
            return _pipeline(root, overrides, force, dvc_remote, deadline)
    except (TaskRunTimeoutError, FlowTimeLimit) as exc:  # not a socket's or a lock's timeout
        if deadline is not None and time.monotonic() >= deadline - 1.0:
            raise FlowTimeLimit(
                f"limits.flow_minutes: the run passed its limit of {limits.flow_minutes:g} min"
            ) from exc
        raise TimeLimit(f"a task passed its limit (params.yaml, limits): {exc}") from exc


CLEANUP_GRACE_S = 60.0


class TimeLimit(VaeError, TimeoutError):
    """A training flow run or one of its tasks passed its limit (params.yaml, limits): the run
    ends TimedOut, and the command line says so in one line."""


class FlowTimeLimit(TimeLimit):
    """The training flow run passed limits.flow_minutes."""


def task_limit(minutes: float, deadline: float | None) -> float | None:
    """A task's timeout_seconds: its own limit (limits section), cut to what is left of the
    flow's. A task whose limit outlasted the flow's would turn the flow's interruption into
    its own TimedOut (Prefect's nested timeouts), reporting the wrong limit."""
    own = LimitsConfig.seconds(minutes)
    left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
    return min(x for x in (own, left) if x is not None) if (own or left) else None


def _pipeline(
    root: Path, overrides: list[str], force: bool, dvc_remote: str | None, deadline: float | None
) -> dict:
    """The training flow's body (see `training_pipeline`)."""
    from flows.events import decision_event, emit_model_event
    from flows.lineage import model_code_hash
    from flows.registry import matching_version, registered_model_name

    logger = get_run_logger()
    client = tracking.connect(tracking.resolve_uri(root))
    tracking.ensure_reachable(client)  # an unreachable backend fails here, not after training
    holder = tracking.prefect_context() | {"workspace": str(root)}
    settle = partial(settle_dead_run, client=client)
    with workspace.exclusive(root, overrides, holder, settle) as params:
        lineage = refresh_data(root, params, dvc_remote)
        name = registered_model_name(params.data.dataset)
        made_from = {
            "dvc.processed_md5": lineage["processed_md5"],
            "params.hash": params.hash(),
            "code.hash": model_code_hash(),
        }
        match = None if force else matching_version(client, name, made_from)
        if match is not None:
            result = _up_to_date(name, match, made_from)
            logger.info(result["gate"]["reason"])
            create_markdown_artifact(
                f"# VAE training pipeline\n\n**{result['gate']['reason']}**\n",
                key="training-pipeline-summary",
                description="up to date: no training, no new version",
            )
            emit_model_event("vae.model.up-to-date", name, match, made_from)
            return result
        out = _train_evaluate_register(root, params, overrides, client, lineage, deadline)
    _publish(out, client)
    reg, gate = out["reg"], out["gate"]
    logger.info(
        "run %s registered %s v%s: %s", out["run_id"], reg["name"], reg["version"], gate["decision"]
    )
    figures = {k: v for k, v in (gate.get("figures") or {}).items() if v is not None}
    emit_model_event(
        decision_event(gate),
        reg["name"],
        reg["version"],
        {"run_id": out["run_id"], "reason": gate.get("reason", ""), **figures},
    )
    return {
        "run_id": out["run_id"],
        "model": reg,
        "figures": run_record.headline(out["figures"]),
        "gate": gate,
        "metrics": out["ev"]["metrics"],
    }
