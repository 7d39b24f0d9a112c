"""Real servers on 127.0.0.1 for the integration tests: one Prefect server for the session
(`prefect server start`, its own PREFECT_HOME; each test filters by its own deployment) and an
MLflow tracking server per module (`mlflow server` on SQLite with proxied artifacts: each
module counts its own registered versions from 1)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from helpers import (
    MLFLOW_SERVER_ENV,
    bin_path,
    child_env,
    free_port,
    mlflow_server_cmd,
    spawn,
    wait_for_http,
)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory) -> Iterator[SimpleNamespace]:
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = child_env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
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
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = child_env(**MLFLOW_SERVER_ENV)
    proc = start_process("mlflow-server", mlflow_server_cmd(root, port), env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", proc, timeout_s=180)
    return SimpleNamespace(url=url, root=root, proc=proc)
