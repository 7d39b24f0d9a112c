"""The `training-pipeline` Prefect flow: fetch -> prepare (DVC) -> train -> evaluate ->
register -> promote, with one MLflow run per flow run.

Tasks pass paths, hashes and small dicts of figures, never tensors. A file lock on the
workspace makes a second run started at the same moment wait for the first, so params.yaml,
dvc.lock, data/ and the registry are only ever changed by one run at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from filelock import FileLock
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)
from prefect.tasks import exponential_backoff

from flows import dvc_runner, tracking
from flows.lineage import data_lineage
from flows.params import flatten, load_params, write_params
from vae_core.data.idx import atomic_write_bytes

LOCK_NAME = ".vae-pipeline.lock"


def processed_path(workdir: Path, dataset: str) -> Path:
    return Path(workdir) / "data" / "processed" / dataset


def classifier_path(workdir: Path, dataset: str) -> Path:
    return Path(workdir) / "data" / "classifier" / dataset


@task(retries=3, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5)
def fetch_data(workdir: str) -> str:
    """`dvc repro fetch`; a transient source failure is retried with exponential backoff."""
    return dvc_runner.repro("fetch", cwd=Path(workdir))


@task
def prepare_data(workdir: str, dataset: str) -> dict:
    """`dvc repro` for the remaining stages; returns the lineage read back from dvc.lock."""
    log = dvc_runner.repro(cwd=Path(workdir))
    lineage = data_lineage(workdir, dataset)
    return {"dvc_log": log, **lineage}


@task
def train_model(workdir: str, params: dict, run_id: str, run_dir: str) -> dict:
    """Train in-process, streaming per-epoch metrics to MLflow and a Prefect progress bar."""
    import mlflow

    from vae_core.data import load_processed
    from vae_core.training import TrainConfig, run_training

    logger = get_run_logger()
    client = tracking.configure(Path(workdir))
    splits = load_processed(processed_path(Path(workdir), params["data"]["dataset"]))
    train_config = TrainConfig.from_dict(params["train"] | {"progress": False})
    progress_id = create_progress_artifact(
        0.0, key="training-progress", description="training epochs done"
    )

    def report(metrics: dict) -> None:
        done = 100.0 * metrics["epoch"] / max(train_config.epochs, 1)
        update_progress_artifact(progress_id, done)
        logger.info(
            "epoch %d/%d  train -ELBO %.2f  val -ELBO %.2f  (%.0f images/s)",
            metrics["epoch"],
            train_config.epochs,
            metrics["train_neg_elbo"],
            metrics["val_neg_elbo"],
            metrics["samples_per_second"],
        )

    # An active run for the length of training, so MLflow samples system metrics.
    with mlflow.start_run(run_id=run_id, log_system_metrics=True):
        metrics = run_training(
            splits,
            params["model"],
            train_config,
            Path(run_dir) / "train",
            callbacks=[tracking.EpochLogger(client, run_id), report],
        )
    update_progress_artifact(progress_id, 100.0)
    history = json.loads((Path(run_dir) / "train" / "history.json").read_text())
    if history:
        client.log_figure(run_id, tracking.loss_curve(history), "loss_curve.png")
    tracking.log_flat_metrics(client, run_id, metrics, prefix="train.")
    return {"model_dir": str(Path(run_dir) / "train" / "model"), "metrics": metrics}


@task
def evaluate(workdir: str, params: dict, run_id: str, model_dir: str, run_dir: str) -> dict:
    """Likelihood and sample quality into one folder, logged to the run."""
    from vae_core.data import load_processed
    from vae_core.evaluation import evaluate_model, load_classifier
    from vae_core.training import load_model, pick_device

    client = tracking.configure(Path(workdir))
    dataset = params["data"]["dataset"]
    splits = load_processed(processed_path(Path(workdir), dataset))
    classifier_dir = classifier_path(Path(workdir), dataset)
    classifier = load_classifier(classifier_dir) if classifier_dir.is_dir() else None
    out_dir = Path(run_dir) / "evaluation"
    ev = params["evaluate"]
    metrics = evaluate_model(
        load_model(Path(model_dir), device=pick_device(params["train"]["device"])),
        splits,
        params["train"]["data_variant"],
        out_dir,
        iwae_k=ev["iwae_k"],
        iwae_test_size=ev["iwae_test_size"],
        num_samples=ev["num_samples"],
        seed=ev["seed"],
        classifier=classifier,
    )
    tracking.log_flat_metrics(client, run_id, metrics)
    client.log_artifacts(run_id, str(out_dir), "evaluation")
    for png in sorted(out_dir.glob("*.png")):
        client.log_artifact(run_id, str(png), "images")
    return {"eval_dir": str(out_dir), "metrics": metrics}


@task
def register(workdir: str, params: dict, run_id: str, model_dir: str, tags: dict) -> dict:
    """Log the pickle-free model and register it as a new version aliased `challenger`."""
    import mlflow

    from flows.model_io import log_vae
    from flows.registry import register_version, registered_model_name

    tracking.configure(Path(workdir))
    with mlflow.start_run(run_id=run_id):
        info = log_vae(Path(model_dir), name="model")
    name = registered_model_name(params["data"]["dataset"])
    version = register_version(
        run_id,
        name,
        "model",
        tags,
        description=f"Trained by MLflow run {run_id}; data md5 {tags.get('dvc.processed_md5')}.",
        model_uri=info.model_uri,
    )
    return {"name": name, "version": str(version.version)}


@task
def promote(workdir: str, params: dict, name: str, version: str) -> dict:
    """The gate: challenger vs champion on the same frozen test set, then aliases (by mode)."""
    from flows.promotion import gate_and_apply

    tracking.configure(Path(workdir))
    splits_dir = processed_path(Path(workdir), params["data"]["dataset"])
    return gate_and_apply(name, version, splits_dir, params)


def _summary(params: dict, run_id: str, train: dict, ev: dict, reg: dict, gate: dict) -> str:
    m = ev["metrics"]
    rows = [
        ("test -ELBO (nats/image)", f"{m.get('test_neg_elbo', float('nan')):.2f}"),
        ("data variant", str(m.get("data_variant", params["train"]["data_variant"]))),
    ]
    if "test_nll_iwae" in m:
        rows.append((f"test NLL, IWAE k={m.get('iwae_k')}", f"{m['test_nll_iwae']:.2f}"))
    rows += [
        ("epochs", str(train["metrics"]["epochs"])),
        ("train images/s", f"{train['metrics']['train_samples_per_second']:.0f}"),
        ("MLflow run", run_id),
        ("model version", f"{reg['name']} v{reg['version']}"),
        ("promotion", f"{gate.get('decision', '?')}: {gate.get('reason', '')}"),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return f"# VAE training pipeline\n\n| what | value |\n| --- | --- |\n{table}\n"


def _train_evaluate_register(
    root: Path, params: dict, overrides: list[str], client, lineage: dict
) -> dict[str, Any]:
    """One MLflow run: train, evaluate, register, promote. On any failure the run is marked
    FAILED with the reason, and a version it registered is deleted again: a failed run never
    leaves a half-registered model behind."""
    from vae_core.training import pick_device

    dataset = params["data"]["dataset"]
    experiment_id = tracking.ensure_experiment(client, dataset, root)
    device = str(pick_device(params["train"]["device"]))
    tags = tracking.lineage_tags(params, lineage, root, device)
    run = client.create_run(experiment_id, tags=tags, run_name=tags["prefect.flow_run_name"])
    run_id = run.info.run_id
    run_dir = root / "runs" / run_id
    try:
        tracking.log_params(client, run_id, flatten(params) | {"overrides": " ".join(overrides)})
        tracking.log_dataset(run_id, lineage, processed_path(root, dataset), dataset)
        train = train_model(str(root), params, run_id, str(run_dir))
        ev = evaluate(str(root), params, run_id, train["model_dir"], str(run_dir))
        headline = {
            f"metric.{k}": f"{v:.4f}"
            for k, v in ev["metrics"].items()
            if k in ("test_neg_elbo", "test_nll_iwae") and isinstance(v, float)
        }
        run_tags = tags | headline | {"mlflow.run_id": run_id}
        reg = register(str(root), params, run_id, train["model_dir"], run_tags)
        gate = promote(str(root), params, reg["name"], reg["version"])
    except BaseException as exc:
        tracking.mark_failed(client, run_id, exc)
        raise
    client.set_tag(run_id, "gate.decision", gate.get("decision", ""))
    client.set_terminated(run_id, "FINISHED")
    return {"run_id": run_id, "train": train, "ev": ev, "reg": reg, "gate": gate}


@flow(name="training-pipeline", log_prints=True)
def training_pipeline(overrides: list[str] | None = None, workdir: str = ".") -> dict[str, Any]:
    """Fetch, prepare, train, evaluate, register and promote one VAE."""
    logger = get_run_logger()
    root = Path(workdir).resolve()
    overrides = list(overrides or [])
    params_file = root / "params.yaml"
    load_params(params_file, overrides)  # refuse bad values before any work starts
    client = tracking.configure(root)
    tracking.ensure_reachable(client)  # an unreachable backend fails here, not after training
    with FileLock(str(root / LOCK_NAME)):
        # Like `dvc exp run -S`: overrides go into params.yaml, so the DVC stages see them. A
        # failed run puts params.yaml and dvc.lock back, so the next (nightly) run does not
        # silently inherit its overrides.
        saved = {
            path: path.read_bytes() for path in (params_file, root / "dvc.lock") if path.is_file()
        }
        try:
            params = write_params(params_file, overrides) if overrides else load_params(params_file)
            fetch_data(str(root))
            lineage = prepare_data(str(root), params["data"]["dataset"])
            out = _train_evaluate_register(root, params, overrides, client, lineage)
        except BaseException:
            for path, content in saved.items():
                atomic_write_bytes(path, content)
            raise
    summary = _summary(params, out["run_id"], out["train"], out["ev"], out["reg"], out["gate"])
    create_markdown_artifact(
        summary,
        key="training-pipeline-summary",
        description="metrics, promotion decision, MLflow run and version",
    )
    reg, gate = out["reg"], out["gate"]
    logger.info(
        "run %s registered %s v%s: %s",
        out["run_id"],
        reg["name"],
        reg["version"],
        gate.get("decision"),
    )
    return {"run_id": out["run_id"], "model": reg, "gate": gate, "metrics": out["ev"]["metrics"]}
