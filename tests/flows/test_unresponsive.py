"""The pieces of dead-run detection that need no server: automations.yaml and the code build the
same automation, every deployment's runs heartbeat often enough for it, a window that a live
run's heartbeats could miss is refused, and importing `flows` sets the heartbeat interval."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml
from helpers import REPO_ROOT, child_env

from flows.cli import main
from flows.unresponsive import (
    HEARTBEAT_SECONDS,
    HEARTBEAT_VARIABLE,
    UNRESPONSIVE_AFTER_S,
    crash_unresponsive_runs,
)


def test_automations_yaml_is_the_automation_serve_creates() -> None:
    from prefect.events.schemas.automations import AutomationCore

    config = yaml.safe_load((REPO_ROOT / "automations.yaml").read_text())
    (declared,) = [AutomationCore.model_validate(a) for a in config["automations"]]
    built = crash_unresponsive_runs()
    assert declared == built
    assert built.trigger.within.total_seconds() == UNRESPONSIVE_AFTER_S > HEARTBEAT_SECONDS
    assert built.trigger.posture == "Proactive" and built.actions[0].state == "CRASHED"


def test_every_deployment_heartbeats_within_the_window() -> None:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    for deployment in config["deployments"]:
        env = deployment["work_pool"]["job_variables"]["env"]
        assert int(env[HEARTBEAT_VARIABLE]) == HEARTBEAT_SECONDS, deployment["name"]


def test_a_window_a_live_run_could_miss_is_refused(monkeypatch, capsys) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # refused before any call
    monkeypatch.setenv(HEARTBEAT_VARIABLE, "60")
    with pytest.raises(ValueError, match="PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60"):
        crash_unresponsive_runs(60)
    assert main(["serve", "--unresponsive-after", "45"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: --unresponsive-after: expected more than the flow runs' heartbeat interval "
        "(PREFECT_FLOWS_HEARTBEAT_FREQUENCY=60), found 45 s"
    )
    monkeypatch.setenv(HEARTBEAT_VARIABLE, "1m")
    with pytest.raises(ValueError, match="PREFECT_FLOWS_HEARTBEAT_FREQUENCY: expected whole"):
        crash_unresponsive_runs(90)


@pytest.mark.parametrize("preset, expected", [(None, HEARTBEAT_SECONDS), ("120", 120)])
def test_importing_flows_sets_the_heartbeat_unless_the_user_did(preset, expected) -> None:
    env = child_env()
    env.pop(HEARTBEAT_VARIABLE, None)
    if preset is not None:
        env[HEARTBEAT_VARIABLE] = preset
    code = "import flows, prefect.settings as s; print(s.get_current_settings().flows"
    code += ".heartbeat_frequency)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) == expected
