"""Real servers on 127.0.0.1 for the integration tests, one of each per test module: a
Prefect server (`prefect server start`, its own PREFECT_HOME) and an MLflow tracking server
(`mlflow server` on SQLite with proxied artifacts)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory, start_process, proc_tools) -> SimpleNamespace:
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = proc_tools.free_port()
    env = proc_tools.env(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_LOGGING_LEVEL="WARNING",
    )
    cmd = [proc_tools.bin_path("prefect"), "server", "start", "--host", "127.0.0.1"]
    proc = start_process("prefect-server", [*cmd, "--port", str(port)], env=env, cwd=home)
    server = SimpleNamespace(api=f"http://127.0.0.1:{port}/api", home=home, proc=proc)
    proc_tools.wait_for_http(f"{server.api}/health", proc, timeout_s=180, expect="true")
    return server


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, start_process, proc_tools) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = proc_tools.free_port()
    cmd = [
        proc_tools.bin_path("mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{root / 'm.db'}",
        "--artifacts-destination",
        str(root / "artifacts"),
        "--workers",
        "1",
    ]
    # No job runner: the pipeline needs none, and it would start 7 extra worker processes.
    env = proc_tools.env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    proc = start_process("mlflow-server", cmd, env=env, cwd=root)
    url = f"http://127.0.0.1:{port}"
    proc_tools.wait_for_http(f"{url}/health", proc, timeout_s=180)
    return SimpleNamespace(url=url, root=root, proc=proc)
