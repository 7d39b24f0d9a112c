"""Helpers for tests against real servers: the Prefect REST API, a Prefect client's
environment, and waiting for a condition (never for a fixed time)."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

FLOW = "training-pipeline"
RUN_TIMEOUT_S = 360  # server start + one tiny run on a busy two-core machine takes ~2-3 min


def api(server: SimpleNamespace, method: str, path: str, body: dict | None = None):
    """One call to the Prefect REST API; None on 404."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{server.api}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


def client_env(server: SimpleNamespace, proc_tools, tmp: Path, **extra: str) -> dict[str, str]:
    """A Prefect client of this server with its own PREFECT_HOME (no user profile)."""
    home = tmp / "prefect-client-home"
    home.mkdir(exist_ok=True)
    return proc_tools.env(PREFECT_API_URL=server.api, PREFECT_HOME=str(home), **extra)


def wait_for(what: str, check, timeout_s: float, proc=None, every_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and not proc.alive():
            pytest.fail(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        time.sleep(every_s)
    tail = f"\n{proc.name} log:\n{proc.tail()}" if proc is not None else ""
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}{tail}")


def deployment_runs(server: SimpleNamespace, deployment: dict, serve) -> list[dict]:
    """Every flow run of ``deployment``; a failed or crashed one fails the test at once, with
    the serving process's log."""
    found = api(
        server,
        "POST",
        "/flow_runs/filter",
        {"deployments": {"id": {"any_": [deployment["id"]]}}, "limit": 200},
    )
    bad = [r for r in found if r["state_type"] in ("FAILED", "CRASHED")]
    if bad:
        pytest.fail(f"a scheduled run ended {bad[0]['state_name']}:\n{serve.tail(150)}")
    return found
