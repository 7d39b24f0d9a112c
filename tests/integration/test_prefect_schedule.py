"""Scheduling on a real Prefect server (`prefect server start` on 127.0.0.1, its own
PREFECT_HOME): `vae-pipeline serve --interval 5` serves the flow, the server's scheduler
creates flow runs of deployment `training-pipeline/test`, one of them completes, and its MLflow
run carries the deployment. prefect.yaml's `nightly` deployment is registered with the real
`prefect deploy` against the same server."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml
from integration_servers import FLOW, RUN_TIMEOUT_S, api, client_env, deployment_runs, wait_for

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_prefect_yaml_declares_the_nightly_deployment() -> None:
    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == "nightly"]
    assert nightly["entrypoint"] == "flows/pipeline.py:training_pipeline"
    assert nightly["work_pool"]["name"] == "local-process"
    assert [s["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert nightly["parameters"]["workdir"] == "."
    module, _, name = nightly["entrypoint"].partition(":")
    assert (REPO_ROOT / module).is_file() and f"def {name}(" in (REPO_ROOT / module).read_text()


@pytest.mark.slow  # a server start plus a full pipeline run: 2-4 min on a busy two-core machine
def test_served_flow_runs_on_its_schedule(
    prefect_server, start_process, proc_tools, workspace_factory, tiny_overrides, tmp_path
) -> None:
    from mlflow import MlflowClient

    ws = workspace_factory("served")
    cmd = [proc_tools.bin_path("vae-pipeline"), "serve", "--interval", "5", "--name", "test"]
    cmd += ["--workdir", str(ws)] + [arg for o in tiny_overrides for arg in ("-S", o)]
    # Due runs are picked up within 2 s (default 10 s).
    env = client_env(prefect_server, proc_tools, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="2")
    t0 = time.monotonic()
    serve = start_process("serve", cmd, env=env, cwd=ws)
    try:
        deployment = wait_for(
            "the served deployment",
            lambda: api(prefect_server, "GET", f"/deployments/name/{FLOW}/test"),
            timeout_s=240,
            proc=serve,
        )
        t_deployed = time.monotonic() - t0
        (schedule,) = deployment["schedules"]
        assert schedule["schedule"]["interval"] == 5.0
        assert deployment["parameters"]["workdir"] == str(ws.resolve())
        # Overlapping runs: the server lets one run at a time and queues the next.
        assert deployment["global_concurrency_limit"]["limit"] == 1
        assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"

        def runs(*state_types: str) -> list[dict]:
            found = deployment_runs(prefect_server, deployment, serve)
            return [r for r in found if r["state_type"] in state_types]

        wait_for(
            "a scheduled flow run to start",
            lambda: runs("PENDING", "RUNNING", "COMPLETED"),
            RUN_TIMEOUT_S,
            proc=serve,
        )
        t_started = time.monotonic() - t0
        # `serve` takes one run at a time (--limit 1, the default), but with a 5 s interval
        # late runs keep piling up: pausing the deployment (which deletes its remaining
        # scheduled runs) keeps this two-core machine on the run that started.
        api(prefect_server, "POST", f"/deployments/{deployment['id']}/pause_deployment")
        (flow_run, *_) = wait_for(
            "a scheduled flow run to complete", lambda: runs("COMPLETED"), RUN_TIMEOUT_S, serve
        )
        print(
            f"\nserve: deployment after {t_deployed:.0f} s, first run started after "
            f"{t_started:.0f} s, completed after {time.monotonic() - t0:.0f} s"
        )
    finally:
        serve.stop()

    assert flow_run["auto_scheduled"] is True  # created by the server's scheduler
    assert flow_run["deployment_id"] == deployment["id"]
    assert flow_run["parameters"]["overrides"] == tiny_overrides

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-mnist")
    (run,) = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`prefect.flow_run_id` = '{flow_run['id']}'",
    )
    assert run.info.status == "FINISHED"
    assert run.data.tags["prefect.deployment"] == "test"
    assert run.data.tags["prefect.flow_run_name"] == flow_run["name"]
    versions = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert len(versions) == 1
    assert versions[0].tags["prefect.deployment"] == "test"


def test_prefect_yaml_deploys_to_a_process_pool(
    prefect_server, proc_tools, workspace_factory, tmp_path
) -> None:
    ws = workspace_factory("deploy")
    env = client_env(prefect_server, proc_tools, tmp_path)
    prefect = proc_tools.bin_path("prefect")
    for args in (
        ["work-pool", "create", "local-process", "--type", "process"],
        ["--no-prompt", "deploy", "--name", "nightly"],
    ):
        out = subprocess.run(
            [prefect, *args], cwd=ws, env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, f"prefect {' '.join(args)}:\n{out.stdout}\n{out.stderr}"

    deployment = api(prefect_server, "GET", f"/deployments/name/{FLOW}/nightly")
    assert deployment is not None
    assert deployment["entrypoint"] == "flows/pipeline.py:training_pipeline"
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
