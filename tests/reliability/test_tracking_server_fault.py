"""The MLflow tracking server killed (once the run has logged its third epoch) while a pipeline
run trains against it. Policy (README, `flows.tracking.lost_server`): MLflow's client retries
each request; when the server stays gone the run fails with one `error:` line, registers
nothing, and the next run after a restart succeeds."""

import os
import signal
import subprocess

import pytest
from helpers import bin_path, child_env, free_port, start_mlflow_server, wait_for
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

MODEL = "mnist-vae"


def _epochs_logged(url: str) -> int:
    """Epochs of val/neg_elbo the newest run has logged so far (0 before it exists)."""
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("vae-mnist")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], max_results=1)
    return len(client.get_metric_history(runs[0].info.run_id, "val/neg_elbo")) if runs else 0


def test_server_killed_during_training(
    prefect_harness, pipeline_workspace, start_process, tmp_path, record
) -> None:
    ws, root, port = pipeline_workspace("ws"), tmp_path / "server", free_port()
    root.mkdir()
    url = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(start_process, "mlflow-server", root, port)
    one_retry = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
    run_env = child_env(PREFECT_API_URL=prefect_harness, MLFLOW_TRACKING_URI=url, **one_retry)
    cmd = [bin_path("vae-pipeline"), "run", "-S", "train.epochs=2000"]
    run = start_process("pipeline-run", cmd, env=run_env, cwd=ws)
    wait_for("the run's third epoch", lambda: _epochs_logged(url) >= 3, 400, run, every_s=0.5)
    os.killpg(server.popen.pid, signal.SIGKILL)
    server.popen.wait()
    run.popen.wait(400)
    output = run.log.read_text(errors="replace")  # stdout and stderr
    errors = [line for line in output.splitlines() if line.startswith("error: ")]

    # The server comes back on the same store: nothing was registered, and the next run works.
    start_mlflow_server(start_process, "mlflow-server-2", root, port)
    client = MlflowClient(url)
    versions = client.search_model_versions(f"name='{MODEL}'")
    (failed,) = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    again = subprocess.run(
        [bin_path("vae-pipeline"), "run"], cwd=ws, env=run_env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    champion = again.returncode == 0 and client.get_model_version_by_alias(MODEL, "champion")
    record(
        "fault: MLflow server killed during training",
        "`mlflow server` SIGKILLed after the run's third epoch (1 HTTP retry), restarted on the "
        "same store; `vae-pipeline run` again",
        f"exit {run.popen.returncode}; {errors or output[-300:]}; versions after: "
        f"{len(versions)}; killed run {failed.info.status}; next run exit {again.returncode}, "
        f"champion v{champion and champion.version}",
    )
    assert run.popen.returncode == 2 and len(errors) == 1, output[-3000:]
    assert errors[0] == (
        f"error: the MLflow tracking server stopped answering ({url}, after 1 retries); the run "
        "failed before registering anything: run it again once the server is back"
    )
    # The command's own word on it is that line, after Prefect's task log (which keeps its
    # traceback, as a log should).
    lines = output.splitlines()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    assert lines.index(errors[0]) > max(tracebacks, default=-1)
    assert versions == []
    # The server was gone when the run failed, so MLflow could not be told: it stays RUNNING.
    assert failed.info.status == "RUNNING"
    assert again.returncode == 0, again.stderr[-3000:]
    assert champion and champion.version == "1"
