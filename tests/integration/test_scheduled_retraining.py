"""A user's scheduled retraining, end to end on real servers: `vae-pipeline serve --interval 5`
against a real `prefect server`, runs tracked on a real `mlflow server` over HTTP, data from a
folder of IDX files.

1. The first scheduled run trains, registers v1 and promotes it.
2. New IDX files land in the same folder (another valid dataset). The next run notices (DVC's
   source fingerprint), trains on them, registers v2 with the new md5 and counts, and the gate
   decides on the new holdout.
3. Nothing changes. The next run trains nothing, registers nothing, moves no alias.
The alias history read from the tracking server lists every move in order.

Runs are let through one phase at a time by resuming the deployment, and paused again once a
run has started, so the data never changes under a run: the test waits for states the server
reports, never for a clock.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from integration_servers import FLOW, RUN_TIMEOUT_S, api, client_env, deployment_runs, wait_for
from synthetic_digits import write_digit_folder

MODEL = "mnist-vae"
SIZES = {"val": 200, "holdout": 200}


@pytest.mark.slow  # two servers and three scheduled runs: several minutes on two cores
def test_scheduled_runs_notice_new_data_skip_unchanged_work_and_keep_history(
    prefect_server,
    mlflow_server,
    start_process,
    proc_tools,
    workspace_factory,
    tiny_overrides,
    tmp_path,
) -> None:
    from mlflow import MlflowClient

    from flows.alias_log import read_history

    ws = workspace_factory("scheduled")
    source = tmp_path / "incoming"
    write_digit_folder(source, 1200, 200, seed=1)
    overrides = [*tiny_overrides, f"data.source={source}"]
    overrides += [f"data.{split}_size={n}" for split, n in SIZES.items()]
    cmd = [proc_tools.bin_path("vae-pipeline"), "serve", "--interval", "5", "--name", "retrain"]
    cmd += ["--workdir", str(ws)] + [arg for o in overrides for arg in ("-S", o)]
    env = client_env(
        prefect_server,
        proc_tools,
        tmp_path,
        PREFECT_RUNNER_POLL_FREQUENCY="2",
        MLFLOW_TRACKING_URI=mlflow_server.url,
    )
    client = MlflowClient(mlflow_server.url)
    serve = start_process("serve-retrain", cmd, env=env, cwd=ws)
    deployment = wait_for(
        "the served deployment",
        lambda: api(prefect_server, "GET", f"/deployments/name/{FLOW}/retrain"),
        timeout_s=240,
        proc=serve,
    )
    seen: set[str] = set()

    def flow_runs() -> list[dict]:
        return deployment_runs(prefect_server, deployment, serve)

    def phase(what: str) -> list[dict]:
        """Let scheduled runs through until one starts, hold the rest back, and return the
        runs of this phase once all of them completed."""
        api(prefect_server, "POST", f"/deployments/{deployment['id']}/resume_deployment")
        wait_for(
            f"{what}: a scheduled run to start",
            lambda: [
                r
                for r in flow_runs()
                if r["id"] not in seen and r["state_type"] in ("PENDING", "RUNNING", "COMPLETED")
            ],
            RUN_TIMEOUT_S,
            proc=serve,
        )
        api(prefect_server, "POST", f"/deployments/{deployment['id']}/pause_deployment")

        def settled() -> list[dict] | None:
            new = [r for r in flow_runs() if r["id"] not in seen]
            if any(r["state_type"] in ("PENDING", "RUNNING") for r in new):
                return None
            return [r for r in new if r["state_type"] == "COMPLETED"] or None

        done = wait_for(f"{what}: its runs to complete", settled, RUN_TIMEOUT_S, proc=serve)
        seen.update(r["id"] for r in flow_runs())
        return done

    def aliases() -> dict[str, str]:
        return {a: str(v) for a, v in client.get_registered_model(MODEL).aliases.items()}

    def versions() -> dict[str, dict[str, str]]:
        found = client.search_model_versions(f"name = '{MODEL}'")
        return {str(v.version): dict(v.tags) for v in found}

    try:
        # 1. The first data: v1, promoted.
        phase("first data")
        after_first = versions()
        assert sorted(after_first) == ["1"]
        assert aliases() == {"champion": "1", "challenger": "1"}
        counts_1 = json.loads(after_first["1"]["data.counts"])
        assert counts_1 == {"train": 800, "val": 200, "holdout": 200, "test": 200}

        # 2. New files in the same folder: fetched, trained, registered, gated on the holdout.
        write_digit_folder(source, 1500, 300, seed=2)
        phase("new data")
        after_new = versions()
        assert sorted(after_new) == ["1", "2"]
        v1, v2 = after_new["1"], after_new["2"]
        assert v2["dvc.raw_md5"] != v1["dvc.raw_md5"]
        assert v2["dvc.processed_md5"] != v1["dvc.processed_md5"]
        assert json.loads(v2["data.counts"]) == {
            "train": 1100,
            "val": 200,
            "holdout": 200,
            "test": 300,
        }
        assert v2["gate.decision"] in ("promote", "reject")
        assert v2["gate.n"] == str(SIZES["holdout"])  # decided on the holdout, not the test set
        aliases_2 = aliases()

        # 3. Nothing changed: nothing trained, registered or moved.
        third = phase("nothing new")
        assert sorted(versions()) == ["1", "2"]
        assert aliases() == aliases_2
        experiment = client.get_experiment_by_name("vae-mnist")
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
    if v2["gate.decision"] == "promote":
        assert moves[3:] == [
            ("gate promote", "champion", "1", "2"),
            ("gate promote", "previous-champion", None, "1"),
        ]
    else:
        assert moves[3:] == []
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))
    # Every move names its actor: the scheduled flow run and its deployment.
    assert all(
        "prefect flow run" in e["actor"] and "deployment retrain" in e["actor"] for e in history
    )
    printed = subprocess.run(
        [proc_tools.bin_path("vae-pipeline"), "history", "--workdir", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert printed.returncode == 0, printed.stderr
    lines = [
        f"v{v}: raw {t['dvc.raw_md5']} processed {t['dvc.processed_md5']} counts "
        f"{t['data.counts']} gate {t['gate.decision']}"
        for v, t in sorted(after_new.items())
    ]
    print("\n" + "\n".join(lines) + "\nthird run: no new version\n\n" + printed.stdout)
    rows = [
        line for line in printed.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()
    ]
    assert len(rows) == len(history)
    assert "| registered | challenger | 1 | 2 |" in printed.stdout
