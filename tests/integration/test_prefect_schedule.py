"""prefect.yaml's `nightly` deployment, registered with the real `prefect deploy` against a real
Prefect server (`prefect server start` on 127.0.0.1, its own PREFECT_HOME).
`vae-pipeline serve`'s schedule is tested end to end in test_scheduled_retraining.py."""

import subprocess
from functools import partial
from pathlib import Path

import pytest
import yaml
from helpers import FLOW, REPO_ROOT, automations_named, bin_path, prefect_client_env
from helpers import prefect_api as api

from flows.unresponsive import AUTOMATION_NAME, HEARTBEAT_SECONDS, UNRESPONSIVE_AFTER_S

pytestmark = pytest.mark.slow  # a Prefect server


def test_prefect_yaml_deploys_the_nightly_deployment_to_a_process_pool(
    prefect_server, workspace_factory, tmp_path
):
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == "nightly"]
    module, _, name = nightly["entrypoint"].partition(":")
    assert (REPO_ROOT / module).is_file() and f"def {name}(" in (REPO_ROOT / module).read_text()
    ws = workspace_factory("deploy")  # a fresh clone: deploying needs no data
    env = prefect_client_env(prefect_server, tmp_path)
    prefect = bin_path("prefect")

    automations = partial(automations_named, prefect_server, AUTOMATION_NAME)
    served_ones = {a["id"] for a in automations()}  # left by `vae-pipeline serve` in other tests
    for args in (
        ["work-pool", "create", "local-process", "--type", "process"],
        ["--no-prompt", "deploy", "--name", "nightly"],
        ["automation", "create", "--from-file", str(REPO_ROOT / "automations.yaml")],
    ):
        out = subprocess.run(
            [prefect, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"

    deployment = api(prefect_server, "GET", f"/deployments/name/{FLOW}/nightly")
    assert deployment is not None
    entrypoint = "flows/pipeline.py:training_pipeline"
    assert deployment["entrypoint"] == nightly["entrypoint"] == entrypoint
    assert deployment["work_pool_name"] == "local-process"
    assert deployment["parameters"] == {"workdir": ".", "overrides": []}
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["active"] is True
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    # The worker will run it in the folder it was deployed from: the workspace.
    (step,) = deployment["pull_steps"]
    directory = step["prefect.deployments.steps.set_working_directory"]["directory"]
    assert Path(directory).resolve() == ws.resolve()
    # Its runs heartbeat every 30 s, and the server crashes one silent for 90 s.
    env_vars = deployment["job_variables"]["env"]
    assert env_vars["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == str(HEARTBEAT_SECONDS)
    (automation,) = [a for a in automations() if a["id"] not in served_ones]
    assert automation["trigger"]["within"] == UNRESPONSIVE_AFTER_S
    assert automation["trigger"]["posture"] == "Proactive"
    api(prefect_server, "DELETE", f"/automations/{automation['id']}")  # the session's server
