"""Real servers on 127.0.0.1: one Prefect server for the session (each test filters by its own
deployment) and an MLflow tracking server per module (each counts its versions from 1)."""

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from helpers import bin_path, child_env, free_port, spawn, start_mlflow_server, wait_for_http


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[SimpleNamespace]:
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    quiet = {"PREFECT_SERVER_UI_ENABLED": "false", "PREFECT_SERVER_LOGGING_LEVEL": "WARNING"}
    # A run queued behind a deployment's busy slot asks again after 2 s (default 30 s).
    quiet["PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS"] = "2"
    env = child_env(PREFECT_HOME=str(home), **quiet)
    cmd = [bin_path("prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    proc = spawn("prefect-server", cmd, home / "server.log", env, home)
    try:
        server = SimpleNamespace(api=f"http://127.0.0.1:{port}/api", home=home, proc=proc)
        wait_for_http(f"{server.api}/health", proc, timeout_s=180, expect="true")
        yield server
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, start_process) -> SimpleNamespace:
    root, port = tmp_path_factory.mktemp("mlflow-server"), free_port()
    proc = start_mlflow_server(start_process, "mlflow-server", root, port)
    return SimpleNamespace(url=f"http://127.0.0.1:{port}", root=root, proc=proc)
