"""The trial task's body: one trial trained and evaluated into its child run, on whichever
worker the task runner picks (`flows.sweep.flow` wraps it as the Prefect task `sweep-trial`)."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

from flows.sweep.devices import _dask_worker, claim_device
from flows.sweep.records import TAG_COMPLETE, TAG_FAILURE, TRIAL_MODEL_ARTIFACT, _set_tags
from flows.sweep.trials import yaml_scalar


def _run_trial_fn(
    workdir: str,
    trial: dict,
    run_id: str,
    tracking_uri: str,
    slots: dict,
) -> dict:
    """Train and evaluate one trial into its child run (created by the flow). A failure is
    recorded on the child (FAILED + failure.reason) and re-raised, so Prefect shows the task
    as failed; the flow carries on with the other trials."""
    from prefect import get_run_logger

    from flows import tracking
    from flows.pipeline import evaluate, processed_path, train_model

    root = Path(workdir)
    # The flow's tracking URI, whatever this worker process inherited: every trial of a sweep
    # must log to the store that holds its parent.
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    client = tracking.configure(root)
    logger = get_run_logger()
    params = copy.deepcopy(trial["params"])
    client.update_run(run_id, "RUNNING")
    try:
        with claim_device(params["train"]["device"], slots) as (device, threads):
            worker = _dask_worker()
            _set_tags(
                client,
                run_id,
                {
                    "device": device,
                    "torch.num_threads": threads,
                    "sweep.worker": getattr(worker, "address", None) or f"pid {os.getpid()}",
                },
            )
            processed = processed_path(root, params["data"]["dataset"])
            if not processed.is_dir():
                raise FileNotFoundError(
                    f"{processed}: no prepared data on this worker; a worker on another machine "
                    f"needs the project at {root} on the same commit and `dvc pull` run there"
                )
            logger.info(
                "trial %s on %s (%d threads): %s",
                trial["label"],
                device,
                threads,
                " ".join(f"{k}={yaml_scalar(v)}" for k, v in trial["overrides"].items()),
            )
            params["train"]["device"] = device
            run_dir = root / "runs" / run_id
            train = train_model(str(root), params, run_id, str(run_dir))
            client.update_run(run_id, "RUNNING")  # start_run's exit marked it FINISHED
            evaluate(str(root), params, run_id, train["model_dir"], str(run_dir))
            # The weights + config (a few MB) so the winner can be registered from any machine.
            client.log_artifacts(run_id, train["model_dir"], TRIAL_MODEL_ARTIFACT)
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        _set_tags(client, run_id, {TAG_FAILURE: reason})
        client.set_terminated(run_id, "FAILED", end_time=int(time.time() * 1000))
        logger.error("trial %s failed: %s", trial["label"], reason)
        raise
    except BaseException:  # interrupted: resumable, not failed
        client.set_terminated(run_id, "KILLED", end_time=int(time.time() * 1000))
        raise
    _set_tags(client, run_id, {TAG_COMPLETE: "true"})
    client.set_terminated(run_id, "FINISHED", end_time=int(time.time() * 1000))
    return {"run_id": run_id, "status": "FINISHED", "model_dir": train["model_dir"]}
