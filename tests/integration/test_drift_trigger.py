"""After the registry, on a real `prefect server` (its triggers and automations running) with
`vae-pipeline serve`: a dead run is marked Crashed by the server, clean digits start nothing, and
drifted digits start a retraining that runs once the dead run's slot is free.

1. `vae-pipeline serve` takes a run, held at the workspace lock (which the test holds), and is
   killed with SIGKILL, the run with it, once the server has stored the run's first heartbeat:
   a machine losing power.
2. While the server waits out the dead run's silence: a champion, trained by `vae-pipeline run`
   (the dead run never held the workspace, so there is nothing to recover).
3. The clone serves again (its runs held at the lock, so nothing trains meanwhile): held-out
   digits scored with `vae-pipeline score` decide `no drift` and start nothing; the same digits
   inverted decide `drift`, and the trigger creates a run of the served deployment, which can
   start only once the dead run's slot is free.
4. Still meanwhile: a value that is bad only deep inside an input fails its scoring run with
   exit 2 and no output file.
5. The server marks the dead run Crashed (flows/unresponsive.py), before any later run in the
   clone could notice it; the triggered run then starts."""

from __future__ import annotations

import subprocess
from datetime import datetime

import numpy as np
import psutil
import pytest
from filelock import FileLock
from helpers import (
    FLOW,
    RUN_TIMEOUT_S,
    automations_named,
    bin_path,
    kill_tree,
    prefect_client_env,
    wait_for,
)
from helpers import prefect_api as api

from flows import workspace
from flows.unresponsive import AUTOMATION_NAME

pytestmark = pytest.mark.slow  # a server, a training run, two serving processes, three scorings

SILENT_S = 40  # the shortest safe window: a live run's heartbeats come every 30 s


def _score(ws, env, *args: str) -> subprocess.CompletedProcess:
    cmd = [bin_path("vae-pipeline"), "score", *args]
    return subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)


def _figures(stdout: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.splitlines() if line.startswith("drift_"))


def test_a_dead_run_is_crashed_by_the_server_and_drift_retrains_once_its_slot_is_free(
    prefect_server, start_process, pipeline_workspace, tmp_path
) -> None:
    import pandas as pd
    from mlflow import MlflowClient

    from vae_core.data import load_processed

    ws = pipeline_workspace("drift")
    env = prefect_client_env(prefect_server, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="1")
    cmd = [bin_path("vae-pipeline"), "serve", "--name", "drift", "--cron", "0 0 1 1 *"]
    cmd += ["--unresponsive-after", str(SILENT_S), "--workdir", str(ws), "-S", "train.epochs=0"]
    lock = FileLock(str(ws / workspace.LOCK_NAME))  # the served runs wait here, Running

    def flow_run(run: dict) -> dict:
        return api(prefect_server, "GET", f"/flow_runs/{run['id']}")

    def heartbeats(run: dict) -> list[dict]:
        events = {"name": ["prefect.flow-run.heartbeat"]}
        resource = {"id": [f"prefect.flow-run.{run['id']}"]}
        body = {"filter": {"event": events, "resource": resource}, "limit": 5}
        return api(prefect_server, "POST", "/events/filter", body)["events"]

    def serving(proc):
        """`proc`, once it says its deployment (and triggers) are registered."""
        ready = lambda: "is being served" in proc.log.read_text(errors="replace")  # noqa: E731
        wait_for(f"{proc.name} to serve", ready, 300, proc, every_s=0.5)
        return proc

    try:
        # 1. The first serving process dies with its run, which never got the workspace.
        with lock:
            serve = serving(start_process("serve-doomed", cmd, env=env, cwd=ws))
            deployment = api(prefect_server, "GET", f"/deployments/name/{FLOW}/drift")
            run_now = f"/deployments/{deployment['id']}/create_flow_run"
            doomed = api(prefect_server, "POST", run_now, {})
            wait_for("the doomed run's heartbeat", lambda: heartbeats(doomed), 300, serve, 0.5)
            assert flow_run(doomed)["state_type"] == "RUNNING"
            killed = kill_tree(serve.popen.pid)
        assert len(killed) >= 2  # the serving process and the flow run it started
        assert not any(psutil.pid_exists(pid) for pid in killed)

        # 2. While the server waits out its silence: a champion, trained by hand.
        trained = subprocess.run(
            [bin_path("vae-pipeline"), "run"], cwd=ws, env=env, capture_output=True, text=True,
            timeout=RUN_TIMEOUT_S,
        )  # fmt: skip
        assert trained.returncode == 0, trained.stderr[-3000:]
        assert flow_run(doomed)["state_type"] in ("RUNNING", "CRASHED")
        clean = load_processed(ws / "data/processed/mnist").test_images.numpy()
        np.save(tmp_path / "clean.npy", clean)
        np.save(tmp_path / "inverted.npy", 255 - clean)

        with lock:
            serve = start_process("serve-again", cmd, env=env, cwd=ws)
            # 3. Scoring, while the dead run still holds the deployment's slot.
            out = tmp_path / "clean.parquet"
            scored = _score(ws, env, "--input", str(tmp_path / "clean.npy"), "--out", str(out))
            assert scored.returncode == 0, scored.stderr[-3000:]
            figures = _figures(scored.stdout)
            assert figures["drift_decision"] == "no-drift", scored.stdout
            assert float(figures["drift_n_batch"]) == len(clean)
            table = pd.read_parquet(out)
            assert len(table) == len(clean) and (table["position"] == np.arange(len(clean))).all()
            assert set(table["source_file"]) == {"clean.npy"}
            assert np.allclose(table["nll"], -table["log_likelihood"]) and table["nll"].gt(0).all()
            assert len(table["latent_mean"].iloc[0]) == 2  # the tiny workspace's latent size

            # Serving again re-made the drift trigger and left the dead-run automation as it
            # was: updating that would have dropped the dead run's pending deadline.
            log = serving(serve).log.read_text()
            assert f"automation {AUTOMATION_NAME} unchanged" in log
            related = f"/automations/related-to/prefect.deployment.{deployment['id']}"
            (trigger,) = api(prefect_server, "GET", related)
            assert trigger["name"] == "retrain-on-drift" and trigger["enabled"]
            assert trigger["trigger"]["expect"] == ["vae.data.drift"]

            def triggered() -> list[dict]:
                body = {"deployments": {"id": {"any_": [deployment["id"]]}}, "limit": 200}
                runs = api(prefect_server, "POST", "/flow_runs/filter", body)
                return [r for r in runs if trigger["id"] in (r["idempotency_key"] or "")]

            inverted = _score(ws, env, "--input", str(tmp_path / "inverted.npy"), "--out", str(out))
            assert inverted.returncode == 0, inverted.stderr[-3000:]
            drifted = _figures(inverted.stdout)
            assert drifted["drift_decision"] == "drift", inverted.stdout
            assert float(drifted["drift_mean_shift_ci_low"]) > 2.0
            (retrain,) = wait_for("the triggered run", triggered, 180, serve)
            assert flow_run(doomed)["state_type"] in ("RUNNING", "CRASHED")

            # 4. NaN in the second chunk: refused after the run began, exit 2, nothing written.
            bad = clean.astype(np.float32).repeat(2, axis=0)[:1100] / 255
            bad[1050, 3, 4] = np.nan
            np.save(tmp_path / "bad.npy", bad)
            bad_out = tmp_path / "b.pq"
            failed = _score(ws, env, "--input", str(tmp_path / "bad.npy"), "--out", str(bad_out))
            assert failed.returncode == 2, failed.stderr[-3000:]
            assert "bad.npy: image 1050 holds nan at pixel (3, 4)" in failed.stderr
            assert not bad_out.exists()
            assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.pq")]

            # 5. The server marks the dead run Crashed; then the triggered run starts.
            crashed = wait_for(
                "the server to mark the dead run Crashed",
                lambda: (s := flow_run(doomed)["state"])["type"] == "CRASHED" and s,
                SILENT_S + 120, serve, 1.0,
            )  # fmt: skip
            assert f"no heartbeat for {SILENT_S} s" in crashed["message"]
            started = wait_for(
                "the triggered run to start",
                lambda: (r := flow_run(retrain))["state_type"] == "RUNNING" and r,
                120, serve, 1.0,
            )  # fmt: skip
            freed = datetime.fromisoformat(crashed["timestamp"])
            assert datetime.fromisoformat(started["start_time"]) > freed
            assert len(triggered()) == 1  # the clean batch's no-drift event started nothing
            serve.stop()
    finally:
        # The short window was this test's: the session's other tests serve with the default.
        for found in automations_named(prefect_server, AUTOMATION_NAME):
            api(prefect_server, "DELETE", f"/automations/{found['id']}")

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-mnist-scoring")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    decisions = [(r.info.status, r.data.tags.get("drift.decision")) for r in runs]
    assert decisions == [("FINISHED", "no drift"), ("FINISHED", "drift"), ("FAILED", None)]
    assert {r.data.tags["model.version"] for r in runs} == {"1"}
    assert "scores_histogram.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
