"""The MLflow tracking server killed while a pipeline run trains against it.

Policy (README, `flows.tracking.lost_server`): MLflow's client retries each request with
backoff (MLFLOW_HTTP_REQUEST_MAX_RETRIES); when the server stays gone the run fails with one
`error:` line, registers nothing, and the next run after a restart succeeds. The server is
killed at a point the run reports (its third logged epoch), never on a timer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

MODEL = "mnist-vae"


def _server_cmd(proc_tools, root: Path, port: int) -> list[str]:
    return [
        proc_tools.bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'm.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip


def _epochs_logged(url: str) -> int:
    """Epochs of val/neg_elbo the newest run has logged so far (0 before it exists)."""
    from mlflow import MlflowClient

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("vae-mnist")
    if experiment is None:
        return 0
    runs = client.search_runs([experiment.experiment_id], max_results=1)
    return len(client.get_metric_history(runs[0].info.run_id, "val/neg_elbo")) if runs else 0


def test_server_killed_during_training(
    pipeline_workspace, start_process, proc_tools, tmp_path, record
) -> None:
    from mlflow import MlflowClient

    ws = pipeline_workspace("ws")
    root = tmp_path / "server"
    root.mkdir()
    port = proc_tools.free_port()
    url = f"http://127.0.0.1:{port}"
    env = proc_tools.env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = start_process("mlflow-server", _server_cmd(proc_tools, root, port), env=env, cwd=root)
    proc_tools.wait_for_http(f"{url}/health", server, timeout_s=180)

    run_env = proc_tools.env(
        MLFLOW_TRACKING_URI=url,
        MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
        MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1",
    )
    cmd = [proc_tools.bin_path("vae-pipeline"), "run", "-S", "train.epochs=2000"]
    with open(tmp_path / "run.log", "w") as log:
        run = subprocess.Popen(cmd, cwd=ws, env=run_env, stdout=log, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 400
        while _epochs_logged(url) < 3:
            assert run.poll() is None, run.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run never logged three epochs"
            time.sleep(0.5)
        os.killpg(server.popen.pid, signal.SIGKILL)
        server.popen.wait()
        _, err = run.communicate(timeout=400)
    stderr = err.decode()
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]

    # The server comes back on the same store: nothing was registered, and the next run works.
    server = start_process(
        "mlflow-server-2", _server_cmd(proc_tools, root, port), env=env, cwd=root
    )
    proc_tools.wait_for_http(f"{url}/health", server, timeout_s=180)
    client = MlflowClient(url)
    versions = client.search_model_versions(f"name='{MODEL}'")
    (failed,) = client.search_runs([client.get_experiment_by_name("vae-mnist").experiment_id])
    again = subprocess.run(
        [proc_tools.bin_path("vae-pipeline"), "run"], cwd=ws, env=run_env,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    champion = (
        client.get_model_version_by_alias(MODEL, "champion") if again.returncode == 0 else None
    )

    record(
        "fault: MLflow server killed during training",
        "`vae-pipeline run -S train.epochs=2000` against `mlflow server`; the server SIGKILLed "
        "after the run logged its third epoch (MLFLOW_HTTP_REQUEST_MAX_RETRIES=1); restarted on "
        "the same store; `vae-pipeline run` again",
        f"exit {run.returncode}; {errors or stderr[-300:]}; versions after: {len(versions)}; "
        f"the killed run: {failed.info.status}; next run exit {again.returncode}, champion "
        f"v{champion.version if champion else None}",
    )
    assert run.returncode == 2 and len(errors) == 1, stderr[-3000:]
    assert errors[0] == (
        f"error: the MLflow tracking server stopped answering ({url}, after 1 retries); the run "
        "failed before registering anything: run it again once the server is back"
    )
    # The command's own word on it is that line, after Prefect's task log (which keeps its
    # traceback, as a log should).
    lines = stderr.splitlines()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    assert lines.index(errors[0]) > max(tracebacks, default=-1)
    assert versions == []
    # The server was gone when the run failed, so MLflow could not be told: it stays RUNNING.
    assert failed.info.status == "RUNNING"
    assert again.returncode == 0, again.stderr[-3000:]
    assert champion is not None and champion.version == "1"
