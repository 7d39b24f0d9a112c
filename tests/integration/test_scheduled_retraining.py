"""A user's scheduled retraining, end to end: `vae-pipeline serve --interval 5` against a real
`prefect server`, runs tracked on a real `mlflow server`, data from a folder of IDX files. Runs
are let through one phase at a time (the deployment resumed, then paused once a run started) so
the data never change under a run: the test waits for states the server reports, not a clock."""

import json
import subprocess

import pytest
from helpers import (
    FLOW,
    RUN_TIMEOUT_S,
    bin_path,
    deployment_runs,
    prefect_client_env,
    wait_for,
    write_idx_folder,
)
from helpers import prefect_api as api
from mlflow import MlflowClient

from flows.alias_log import read_history

MODEL = "mnist-vae"
SIZES = {"val": 200, "holdout": 200}

pytestmark = pytest.mark.slow  # two servers and three scheduled runs


def test_scheduled_runs_notice_new_data_skip_unchanged_work_and_keep_history(
    prefect_server, mlflow_server, start_process, pipeline_workspace, tmp_path
) -> None:
    ws = pipeline_workspace("scheduled")  # tiny settings in params.yaml; the data are new
    source = tmp_path / "incoming"
    write_idx_folder(source, 1200, 200, seed=1, learnable=True)
    overrides = [f"data.source={source}"]
    overrides += [f"data.{split}_size={n}" for split, n in SIZES.items()]
    cmd = [bin_path("vae-pipeline"), "serve", "--interval", "5", "--name", "retrain"]
    cmd += ["--workdir", str(ws)] + [arg for o in overrides for arg in ("-S", o)]
    # Due runs are picked up within 1 s (default 10 s); every run tracked on the server.
    env = prefect_client_env(prefect_server, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="1")
    env["MLFLOW_TRACKING_URI"] = mlflow_server.url
    client = MlflowClient(mlflow_server.url)
    serve = start_process("serve-retrain", cmd, env=env, cwd=ws)
    served = f"/deployments/name/{FLOW}/retrain"
    deployment = wait_for(
        "the served deployment", lambda: api(prefect_server, "GET", served), 240, serve
    )
    # The served deployment: every 5 s, in the workspace, one run at a time (the server
    # queues an overlapping one).
    (schedule,) = deployment["schedules"]
    assert schedule["schedule"]["interval"] == 5.0
    assert deployment["parameters"]["workdir"] == str(ws.resolve())
    assert deployment["global_concurrency_limit"]["limit"] == 1
    assert deployment["concurrency_options"]["collision_strategy"] == "ENQUEUE"
    seen: set[str] = set()

    def flow_runs() -> list[dict]:
        return deployment_runs(prefect_server, deployment, serve)

    def phase(what: str) -> list[dict]:
        """Let scheduled runs through until one starts, hold the rest back, and return the
        runs of this phase once all of them completed."""
        api(prefect_server, "POST", f"/deployments/{deployment['id']}/resume_deployment")
        started = ("PENDING", "RUNNING", "COMPLETED")
        wait_for(
            f"{what}: a scheduled run to start",
            lambda: [r for r in flow_runs() if r["id"] not in seen and r["state_type"] in started],
            RUN_TIMEOUT_S,
            proc=serve,
            every_s=0.5,
        )
        api(prefect_server, "POST", f"/deployments/{deployment['id']}/pause_deployment")

        def settled() -> list[dict] | None:
            new = [r for r in flow_runs() if r["id"] not in seen]
            if any(r["state_type"] in ("PENDING", "RUNNING") for r in new):
                return None
            return [r for r in new if r["state_type"] == "COMPLETED"] or None

        done = wait_for(
            f"{what}: its runs to complete", settled, RUN_TIMEOUT_S, proc=serve, every_s=0.5
        )
        seen.update(r["id"] for r in flow_runs())
        return done

    def aliases() -> dict[str, str]:
        return {a: str(v) for a, v in client.get_registered_model(MODEL).aliases.items()}

    def versions() -> dict[str, dict[str, str]]:
        found = client.search_model_versions(f"name = '{MODEL}'")
        return {str(v.version): dict(v.tags) for v in found}

    try:
        # 1. The first data: v1, promoted, by a run the server's scheduler created.
        first = phase("first data")
        after_first = versions()
        assert sorted(after_first) == ["1"]
        experiment = client.get_experiment_by_name("vae-mnist")
        (run_1,) = client.search_runs([experiment.experiment_id])
        (flow_run,) = [r for r in first if r["id"] == run_1.data.tags["prefect.flow_run_id"]]
        assert flow_run["auto_scheduled"] is True and flow_run["deployment_id"] == deployment["id"]
        assert flow_run["parameters"]["overrides"] == overrides
        assert run_1.info.status == "FINISHED"
        assert run_1.data.tags["prefect.deployment"] == "retrain"
        assert run_1.data.tags["prefect.flow_run_name"] == flow_run["name"]
        assert after_first["1"]["prefect.deployment"] == "retrain"
        assert aliases() == {"champion": "1", "challenger": "1"}
        counts_1 = json.loads(after_first["1"]["data.counts"])
        assert counts_1 == {"train": 800, "val": 200, "holdout": 200, "test": 200}

        # 2. New files in the same folder: fetched, trained, registered, gated on the holdout.
        write_idx_folder(source, 1500, 300, seed=2, learnable=True)
        phase("new data")
        after_new = versions()
        assert sorted(after_new) == ["1", "2"]
        v1, v2 = after_new["1"], after_new["2"]
        assert v2["dvc.raw_md5"] != v1["dvc.raw_md5"]
        assert v2["dvc.processed_md5"] != v1["dvc.processed_md5"]
        counts_2 = {"train": 1100, "val": 200, "holdout": 200, "test": 300}
        assert json.loads(v2["data.counts"]) == counts_2
        assert v2["gate.decision"] in ("promote", "reject")
        assert v2["gate.n"] == str(SIZES["holdout"])  # decided on the holdout, not the test set
        aliases_2 = aliases()

        # 3. Nothing changed: nothing trained, registered or moved.
        third = phase("nothing new")
        assert sorted(versions()) == ["1", "2"]
        assert aliases() == aliases_2
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 2  # one MLflow run per trained version, none for the skip
        assert third and all(r["state_type"] == "COMPLETED" for r in third)
    finally:
        serve.stop()

    # The alias history, from the tracking server alone, in the order of the moves.
    history = read_history(client, MODEL)
    moves = [(e["action"], e["alias"], e["from"], e["to"]) for e in history]
    assert moves[:3] == [
        ("registered", "challenger", None, "1"),
        ("gate promote", "champion", None, "1"),
        ("registered", "challenger", "1", "2"),
    ]
    promoted = [
        ("gate promote", "champion", "1", "2"),
        ("gate promote", "previous-champion", None, "1"),
    ]
    assert moves[3:] == (promoted if v2["gate.decision"] == "promote" else [])
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    # Every move names its actor: the scheduled flow run and its deployment.
    actors = [e["actor"] for e in history]
    assert all("prefect flow run" in a and "deployment retrain" in a for a in actors)
    cmd = [bin_path("vae-pipeline"), "history", "--workdir", str(ws)]
    printed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert printed.returncode == 0, printed.stderr
    print(f"\nversions: {after_new}\nthird run: no new version\n\n{printed.stdout}")
    rows = [row for row in printed.stdout.splitlines() if row.startswith("| ") and row[2].isdigit()]
    assert len(rows) == len(history)
    assert "| registered | challenger | 1 | 2 |" in printed.stdout
