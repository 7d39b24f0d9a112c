"""A serving process killed with SIGKILL mid-run, its flow run with it (a machine losing
power): the Prefect server itself marks the run Crashed once its heartbeats stop (the automation
of flows/unresponsive.py, which `vae-pipeline serve` creates), before any later run in that
clone could notice, and the run queued behind it on the deployment's one slot then goes through.

The doomed run is held at a point the test controls: the workspace lock, which the test holds,
and it is killed only once the server has stored its first heartbeat."""

from __future__ import annotations

from datetime import datetime

import psutil
import pytest
from filelock import FileLock
from helpers import FLOW, RUN_TIMEOUT_S, bin_path, kill_tree, prefect_client_env, wait_for
from helpers import prefect_api as api

from flows import workspace
from flows.unresponsive import AUTOMATION_NAME

pytestmark = pytest.mark.slow

SILENT_S = 40  # the shortest safe window: Prefect's heartbeats come every 30 s at the most


def test_a_killed_runs_server_marks_it_crashed_and_the_queued_run_goes_through(
    prefect_server, pipeline_workspace, start_process, tmp_path
) -> None:
    ws = pipeline_workspace("unresponsive")
    cmd = [bin_path("vae-pipeline"), "serve", "--name", "unresponsive", "--cron", "0 0 1 1 *"]
    cmd += ["--unresponsive-after", str(SILENT_S), "--workdir", str(ws), "-S", "train.epochs=0"]
    env = prefect_client_env(prefect_server, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="1")

    def flow_run(run: dict) -> dict:
        return api(prefect_server, "GET", f"/flow_runs/{run['id']}")

    def automations() -> list[dict]:
        found = api(prefect_server, "POST", "/automations/filter", {})
        return [a for a in found if a["name"] == AUTOMATION_NAME]

    def heartbeats(run: dict) -> list[dict]:
        events = {"name": ["prefect.flow-run.heartbeat"]}
        resource = {"id": [f"prefect.flow-run.{run['id']}"]}
        body = {"filter": {"event": events, "resource": resource}, "limit": 5}
        return api(prefect_server, "POST", "/events/filter", body)["events"]

    serving = []
    try:
        with FileLock(str(ws / workspace.LOCK_NAME)):  # the first run waits here, Running
            serving.append(start_process("serve-doomed", cmd, env=env, cwd=ws))
            path = f"/deployments/name/{FLOW}/unresponsive"
            deployment = wait_for("the deployment", lambda: api(prefect_server, "GET", path), 300)
            (automation,) = automations()
            assert automation["trigger"]["within"] == SILENT_S
            assert automation["actions"][0]["state"] == "CRASHED"
            run_now = f"/deployments/{deployment['id']}/create_flow_run"
            doomed = api(prefect_server, "POST", run_now, {})
            wait_for("the doomed run's first heartbeat", lambda: heartbeats(doomed), 300)
            assert flow_run(doomed)["state_type"] == "RUNNING"
            killed = kill_tree(serving[0].popen.pid)
        assert len(killed) >= 2  # the serving process and the flow run it started
        assert not any(psutil.pid_exists(pid) for pid in killed)

        # The same clone serves again at once; its next run waits for the dead run's slot.
        serving.append(start_process("serve-again", cmd, env=env, cwd=ws))
        queued = api(prefect_server, "POST", run_now, {})
        waiting = wait_for(
            "the next run to wait for the slot",
            lambda: flow_run(queued)["state_name"] == "AwaitingConcurrencySlot",
            300, serving[1], 1.0,
        )  # fmt: skip
        assert waiting and flow_run(doomed)["state_type"] == "RUNNING"

        crashed = wait_for(
            "the server to mark the killed run Crashed",
            lambda: (s := flow_run(doomed)["state"])["type"] == "CRASHED" and s,
            SILENT_S + 120, serving[1], 1.0,
        )  # fmt: skip
        assert f"no heartbeat for {SILENT_S} s" in crashed["message"]
        # Serving again left the automation as it was: updating it would have dropped the
        # dead run's pending deadline (the first version of this test found that).
        assert f"automation {AUTOMATION_NAME} unchanged" in serving[1].log.read_text()
        done = wait_for(
            "the queued run to end",
            lambda: (r := flow_run(queued))["state"]["type"] in ("COMPLETED", "FAILED") and r,
            RUN_TIMEOUT_S, serving[1],
        )  # fmt: skip
        assert done["state_type"] == "COMPLETED", done["state"]["message"]
        # It started only once the server had freed the slot.
        assert datetime.fromisoformat(done["start_time"]) > datetime.fromisoformat(
            crashed["timestamp"]
        )
    finally:
        for proc in serving:
            proc.stop()
        # The short window was this test's; the session's other servers get the default.
        for found in automations():
            api(prefect_server, "DELETE", f"/automations/{found['id']}")
