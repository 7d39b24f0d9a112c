"""`vae-pipeline serve --on-overlap cancel-new` against the session's Prefect server (the test
harness: a real server in its own process). The served deployment lets one flow run at a time,
and the server cancels a run that comes while one runs.

The first run is held at a point it reaches on its own: the workspace lock, which the test
holds, so it stays Running; nothing waits on a clock. `--limit 2` lets the serving process
take the second run too, so the server's deployment limit, not the process, decides."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from filelock import FileLock
from helpers import FLOW, bin_path, prefect_api, prefect_client_env, wait_for

from flows import workspace

pytestmark = pytest.mark.slow


def test_a_run_that_overlaps_is_cancelled(
    prefect_harness, module_workspace, start_process, tmp_path
):
    server = SimpleNamespace(api=prefect_harness)
    ws = module_workspace("serve-cancel-new")
    cmd = [bin_path("vae-pipeline"), "serve", "--name", "cancel-new", "--on-overlap", "cancel-new"]
    cmd += ["--cron", "0 0 1 1 *", "--limit", "2", "--workdir", str(ws), "-S", "train.epochs=0"]
    env = prefect_client_env(server, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="1")

    def state(run: dict) -> str:
        return prefect_api(server, "GET", f"/flow_runs/{run['id']}")["state_type"]

    with FileLock(str(ws / workspace.LOCK_NAME)):
        serve = start_process("serve-cancel-new", cmd, env=env, cwd=ws)
        path = f"/deployments/name/{FLOW}/cancel-new"
        deployment = wait_for(
            "the deployment", lambda: prefect_api(server, "GET", path), 300, serve
        )
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"
        assert deployment["parameters"] == {"overrides": ["train.epochs=0"], "workdir": str(ws)}

        run_now = f"/deployments/{deployment['id']}/create_flow_run"
        first = prefect_api(server, "POST", run_now, {})
        wait_for("the first run to start", lambda: state(first) == "RUNNING", 300, serve, 1.0)
        second = prefect_api(server, "POST", run_now, {})
        wait_for("the second run to end", lambda: state(second) in ("CANCELLED", "COMPLETED"), 300)
        assert state(second) == "CANCELLED"
        details = prefect_api(server, "GET", f"/flow_runs/{second['id']}")["state"]
        assert details["message"] == "Deployment concurrency limit reached."
        assert state(first) == "RUNNING"  # still waiting for the workspace the test holds
        serve.stop()
