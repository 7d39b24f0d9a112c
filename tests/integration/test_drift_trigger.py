"""Batch scoring that decides drift and starts a retraining, on a real `prefect server`: a
champion trained by `vae-pipeline run`; `vae-pipeline serve` with its drift trigger (its runs
held at the workspace lock, which the test holds, so nothing trains meanwhile); held-out
digits scored with `vae-pipeline score` decide `no drift` and start nothing, the same digits
inverted decide `drift` and the trigger creates a run of the served deployment. A value that is
bad only deep inside the input fails the run with exit 2 and leaves no output file."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from filelock import FileLock
from helpers import FLOW, RUN_TIMEOUT_S, bin_path, prefect_client_env, wait_for
from helpers import prefect_api as api

from flows import workspace

pytestmark = pytest.mark.slow  # a server, a training run and three scoring runs


def _score(ws, env, *args: str) -> subprocess.CompletedProcess:
    cmd = [bin_path("vae-pipeline"), "score", *args]
    return subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=300)


def _figures(stdout: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.splitlines() if line.startswith("drift_"))


def test_clean_digits_start_nothing_and_inverted_ones_trigger_a_retraining_run(
    prefect_server, start_process, pipeline_workspace, tmp_path
) -> None:
    import pandas as pd
    from mlflow import MlflowClient

    from vae_core.data import load_processed

    ws = pipeline_workspace("drift")
    env = prefect_client_env(prefect_server, tmp_path, PREFECT_RUNNER_POLL_FREQUENCY="1")
    trained = subprocess.run(
        [bin_path("vae-pipeline"), "run"], cwd=ws, env=env, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S,
    )  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    clean = load_processed(ws / "data/processed/mnist").test_images.numpy()
    np.save(tmp_path / "clean.npy", clean)
    np.save(tmp_path / "inverted.npy", 255 - clean)

    cmd = [bin_path("vae-pipeline"), "serve", "--name", "drift", "--cron", "0 0 1 1 *"]
    cmd += ["--workdir", str(ws), "-S", "train.epochs=0"]
    with FileLock(str(ws / workspace.LOCK_NAME)):
        serve = start_process("serve-drift", cmd, env=env, cwd=ws)
        path = f"/deployments/name/{FLOW}/drift"
        deployment = wait_for(
            "the deployment", lambda: api(prefect_server, "GET", path), 300, serve
        )
        related = f"/automations/related-to/prefect.deployment.{deployment['id']}"
        (automation,) = api(prefect_server, "GET", related)
        assert automation["name"] == "retrain-on-drift" and automation["enabled"]
        assert automation["trigger"]["expect"] == ["vae.data.drift"]

        def triggered() -> list[dict]:
            body = {"deployments": {"id": {"any_": [deployment["id"]]}}, "limit": 200}
            runs = api(prefect_server, "POST", "/flow_runs/filter", body)
            return [r for r in runs if automation["id"] in (r["idempotency_key"] or "")]

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

        inverted = _score(ws, env, "--input", str(tmp_path / "inverted.npy"), "--out", str(out))
        assert inverted.returncode == 0, inverted.stderr[-3000:]
        drifted = _figures(inverted.stdout)
        assert drifted["drift_decision"] == "drift", inverted.stdout
        assert float(drifted["drift_mean_shift_ci_low"]) > 2.0
        (run,) = wait_for("the triggered run", triggered, 180, serve)
        # The served process picks it up; it waits for the workspace the test holds.
        state = lambda: api(prefect_server, "GET", f"/flow_runs/{run['id']}")["state_type"]  # noqa: E731
        wait_for("the triggered run to start", lambda: state() == "RUNNING", 120, serve, 1.0)
        assert len(triggered()) == 1  # the clean batch's no-drift event started nothing
        serve.stop()

    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("vae-mnist-scoring")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time"])
    assert [r.data.tags["drift.decision"] for r in runs] == ["no drift", "drift"]
    assert {r.data.tags["model.version"] for r in runs} == {"1"}
    assert "scores_histogram.png" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}

    # NaN in the second chunk: refused after the run began, exit 2, nothing written.
    bad = clean.astype(np.float32).repeat(2, axis=0)[:1100] / 255
    bad[1050, 3, 4] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    failed = _score(ws, env, "--input", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "b.pq"))
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert "bad.npy: image 1050 holds nan at pixel (3, 4)" in failed.stderr
    assert not (tmp_path / "b.pq").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.pq")]
