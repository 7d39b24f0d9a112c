"""Time limits (params.yaml's `limits` section) on real pipeline runs (the session's Prefect API,
MLflow's SQLite store, the real `dvc` CLI): a run whose training cannot end by itself (a million
epochs, no early stopping, no budget) is stopped by the train task's limit, then by the flow's
own; each ends TimedOut with params.yaml and dvc.lock as they were, the workspace free, its
MLflow run FAILED and nothing registered, and the next run goes through."""

from __future__ import annotations

import pytest
from filelock import FileLock

from flows import workspace
from flows.pipeline import training_pipeline

pytestmark = pytest.mark.slow

# Batch 1: long epochs, so a limit lands in the training arithmetic, seldom in an epoch's
# MLflow write (an interruption inside a SQLite write is the case to keep out of this test).
NEVER_ENDS = ["train.epochs=1000000", "train.patience=0", "train.max_minutes=0"]
NEVER_ENDS += ["train.batch_size=1"]


def test_a_run_past_its_limit_ends_timed_out_cleans_up_and_the_next_goes_through(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace
) -> None:
    from mlflow import MlflowClient

    ws = pipeline_workspace("limits")
    files = ("params.yaml", "dvc.lock")
    before = {name: (ws / name).read_bytes() for name in files}
    limits = {
        "limits.train_minutes=0.02": "a task passed its limit",
        # 9 s: the stages take 2-4 s here. Were they slower, the train task would get what is
        # left (at least 1 ms) or the flow's own alarm would come a minute later: the same end.
        "limits.flow_minutes=0.15": "limits.flow_minutes",
    }
    for limit, error in limits.items():
        state = training_pipeline(
            overrides=[*NEVER_ENDS, limit], workdir=str(ws), return_state=True
        )
        assert state.name == "TimedOut" and error in state.message, (limit, state.message)
        assert {name: (ws / name).read_bytes() for name in files} == before
        with FileLock(str(ws / workspace.LOCK_NAME), timeout=0):
            pass  # free: a held lock would raise Timeout at once

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-mnist")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert runs and all(run.info.status == "FAILED" for run in runs)
    failures = [run.data.tags["failure.reason"] for run in runs]
    assert failures[0].startswith("TaskRunTimeoutError"), failures
    assert all(f.startswith(("TaskRunTimeoutError", "FlowTimeLimit")) for f in failures), failures
    assert not client.search_model_versions("name='mnist-vae'")

    done = training_pipeline(overrides=[], workdir=str(ws), return_state=True)
    assert done.is_completed(), done.message
    assert [str(v.version) for v in client.search_model_versions("name='mnist-vae'")] == ["1"]
