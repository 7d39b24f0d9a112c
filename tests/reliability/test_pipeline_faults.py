"""Faults in a real pipeline run: the Prefect flow against the session's Prefect API, MLflow's
SQLite store in a throw-away git + DVC workspace, the real `dvc` CLI.

- A NaN loss (injected in epoch 2 by wrapping the trainer's loss function): the flow fails,
  the MLflow run is FAILED with the reason, nothing is registered or promoted, and the
  workspace is left as it was.
- The MLflow backend unreachable (a closed port): one clear error, nothing registered, and the
  workspace's own SQLite store untouched (no silent fallback to it).
- The MLflow backend dropping out during registration (injected after the version is
  created): no half-registered version is left behind.
- Two `vae-pipeline run` processes started at the same moment on one workspace: both finish,
  one after the other, and dvc.lock, the data and the registry stay consistent, each version
  with its own run and lineage; no credential from the environment reaches any file.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

MODEL = "mnist-vae"
EXPERIMENT = "vae-mnist"
CANARY = "canary-s3cr3t-8d1f0c"


def client_for(ws: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")


def registry_state(ws: Path) -> dict:
    """{version: (run_id, aliases)} of the workspace's registered model (empty if none)."""
    client = client_for(ws)
    out = {}
    for mv in client.search_model_versions(f"name='{MODEL}'"):
        out[str(mv.version)] = mv.run_id
    aliases = {}
    if out:
        aliases = {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}
    return {"versions": out, "aliases": aliases}


def runs_of(ws: Path) -> list:
    client = client_for(ws)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def lock_is_free(ws: Path) -> bool:
    from filelock import FileLock, Timeout

    try:
        with FileLock(str(ws / ".vae-pipeline.lock"), timeout=0):
            return True
    except Timeout:
        return False


def run_cli(argv: list[str]) -> tuple[int | None, str, BaseException | None, float]:
    """`vae-pipeline ARGV` in-process: (exit status or None, stderr, uncaught exception, s).

    stderr goes to a StringIO that is never closed, not to capsys: Prefect's log handlers keep
    the stream they first saw, and a closed capsys stream breaks the next flow run's logging.
    """
    import contextlib
    import io

    from flows.cli import main

    err = io.StringIO()
    t0 = time.monotonic()
    rc, exc = None, None
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException as e:  # uncaught: what a user would see as a traceback
            exc = e
    return rc, err.getvalue(), exc, time.monotonic() - t0


# --------------------------------------------------------------------------- NaN loss


@pytest.fixture(scope="module")
def nan_run(prefect_harness, isolated_mlflow_uri, reliability_template, tmp_path_factory, helpers):
    """One pipeline run whose training loss turns NaN in epoch 2 (of 3)."""
    import shutil

    import vae_core.training.trainer as trainer_mod

    ws = tmp_path_factory.mktemp("nan") / "ws"
    shutil.copytree(reliability_template, ws, symlinks=True)
    before = SimpleNamespace(
        params=(ws / "params.yaml").read_bytes(),
        lock=(ws / "dvc.lock").read_bytes(),
        data=helpers.tree_digest(ws / "data"),
    )
    real_loss, real_epoch = trainer_mod.training_loss, trainer_mod.Trainer.train_epoch
    current = {"epoch": 0}

    def train_epoch(self, train_x, epoch, beta):
        current["epoch"] = epoch
        return real_epoch(self, train_x, epoch, beta)

    def poisoned_loss(model, x, eps, beta, objective):
        loss, bound = real_loss(model, x, eps, beta, objective)
        return (loss * float("nan"), bound) if current["epoch"] >= 1 else (loss, bound)

    with pytest.MonkeyPatch.context() as mp:
        # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which the pipeline prefers over
        # its workspace store: start every in-process run without it.
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setattr(trainer_mod, "training_loss", poisoned_loss)
        mp.setattr(trainer_mod.Trainer, "train_epoch", train_epoch)
        rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws), "-S", "train.epochs=3"])
    return SimpleNamespace(ws=ws, rc=rc, exc=exc, err=err, before=before, s=seconds)


def test_nan_loss_fails_the_flow_and_marks_the_run_failed(nan_run, record, helpers) -> None:
    runs = runs_of(nan_run.ws)
    run = runs[0] if runs else None
    reason = run.data.tags.get("failure.reason", "") if run else ""
    history = (
        client_for(nan_run.ws).get_metric_history(run.info.run_id, "val/neg_elbo") if run else []
    )
    errors = [ln for ln in nan_run.err.splitlines() if ln.startswith("error: ")]
    record(
        "fault: NaN loss (run)",
        "pipeline run (`vae-pipeline run -S train.epochs=3`, in-process) whose training loss "
        "is made NaN from epoch 2 on",
        f"exit {nan_run.rc} after {nan_run.s:.0f} s: "
        f"{helpers.short(errors[0]) if errors else repr(nan_run.exc)!r}; MLflow runs: "
        f"{[r.info.status for r in runs]}, failure.reason {helpers.short(reason, 80)!r}; "
        f"val -ELBO logged for epochs {[m.step for m in history]}",
    )
    assert nan_run.exc is None, f"uncaught {nan_run.exc!r}"
    assert nan_run.rc == 2 and errors, nan_run.err[-2000:]
    assert "training loss became nan at epoch 2" in errors[0]
    assert len(runs) == 1 and run.info.status == "FAILED"
    assert reason.startswith("NonFiniteLossError") and "nan" in reason and "epoch 2" in reason
    assert [m.step for m in history] == [1]


def test_nan_loss_registers_and_promotes_nothing(nan_run, record) -> None:
    state = registry_state(nan_run.ws)
    runs = runs_of(nan_run.ws)
    artifacts = (
        [a.path for a in client_for(nan_run.ws).list_artifacts(runs[0].info.run_id)] if runs else []
    )
    record(
        "fault: NaN loss (registry)",
        "the registry and the run's artifacts read back after the NaN run",
        f"versions {state['versions'] or 'none'}, aliases {state['aliases'] or 'none'}, "
        f"model artifact logged: {'model' in artifacts}",
    )
    assert state == {"versions": {}, "aliases": {}}
    assert "model" not in artifacts


def test_failed_run_leaves_the_workspace_as_it_was(nan_run, record, helpers) -> None:
    ws, before = nan_run.ws, nan_run.before
    params_same = (ws / "params.yaml").read_bytes() == before.params
    lock_same = (ws / "dvc.lock").read_bytes() == before.lock
    data_same = helpers.tree_digest(ws / "data") == before.data
    free = lock_is_free(ws)
    record(
        "fault: NaN loss (workspace)",
        "params.yaml, dvc.lock, data/ and the workspace lock compared with before the failed "
        "run (it was given -S train.epochs=3)",
        f"params.yaml {'as before' if params_same else 'KEEPS THE FAILED RUN OVERRIDE'}, "
        f"dvc.lock {'as before' if lock_same else 'CHANGED'}, data "
        f"{'as before' if data_same else 'CHANGED'}, lock {'released' if free else 'HELD'}",
    )
    assert lock_same and data_same and free
    assert params_same, (
        "a failed run leaves its overrides in params.yaml, so the next run without overrides "
        "(the nightly schedule) silently reuses them"
    )


# --------------------------------------------------------------------------- MLflow down


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def test_mlflow_unreachable_is_a_clear_error_and_registers_nothing(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, monkeypatch, record, helpers
) -> None:
    ws = pipeline_workspace("mlflow-down")
    store_before = (ws / "mlflow.db").read_bytes()
    mlruns_before = helpers.tree_digest(ws / "mlruns")
    port = closed_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws), "-S", "train.epochs=1"])
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    shown = helpers.short(errors[0]) if errors else f"uncaught {type(exc).__name__}: {exc}"
    store_same = (ws / "mlflow.db").read_bytes() == store_before
    trained = (ws / "runs").exists()
    record(
        "fault: MLflow unreachable",
        f"`vae-pipeline run` (in-process) with MLFLOW_TRACKING_URI={uri} (closed port), "
        "HTTP retries 0",
        f"exit {rc} after {seconds:.0f} s: {helpers.short(shown, 130)!r}; workspace mlflow.db "
        f"{'untouched' if store_same else 'WRITTEN'}, mlruns/ "
        f"{'untouched' if helpers.tree_digest(ws / 'mlruns') == mlruns_before else 'WRITTEN'}, "
        f"training {'started' if trained else 'not started'}; lock "
        f"{'released' if lock_is_free(ws) else 'HELD'}",
    )
    assert store_same and helpers.tree_digest(ws / "mlruns") == mlruns_before
    assert registry_state(ws) == {"versions": {}, "aliases": {}}
    assert not trained, "training ran although nothing could be tracked"
    assert lock_is_free(ws)
    assert exc is None, (
        f"the CLI let {type(exc).__name__} escape (a traceback, exit 1) instead of one "
        f"`error:` line: {exc}"
    )
    assert rc == 2 and errors and f"127.0.0.1:{port}" in errors[0], err[-2000:]


def test_mlflow_outage_during_registration_leaves_no_half_registered_version(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, monkeypatch, record, helpers
) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    ws = pipeline_workspace("mlflow-drop")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def outage(self, *args, **kwargs):
        raise MlflowException(
            "API request to http://tracking.example:5000/api/2.0/mlflow/registered-models/alias "
            "failed with exception ConnectionError: Connection refused (injected)"
        )

    # The version is created (register_model), then the backend goes away before the alias.
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", outage)
    rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws), "-S", "train.epochs=1"])
    monkeypatch.undo()
    state = registry_state(ws)
    runs = runs_of(ws)
    statuses = [r.info.status for r in runs]
    failed_ids = {r.info.run_id for r in runs if r.info.status == "FAILED"}
    half = {v: r for v, r in state["versions"].items() if r in failed_ids}
    err_line = next((ln for ln in err.splitlines() if ln.startswith("error: ")), "")
    record(
        "fault: MLflow drops during registration",
        "pipeline run whose tracking backend fails (connection refused) right after the model "
        "version is created, before its alias is set",
        f"exit {rc}{' (uncaught ' + type(exc).__name__ + ')' if exc else ''} after "
        f"{seconds:.0f} s ({helpers.short(err_line or repr(exc), 90)!r}); runs {statuses}; "
        f"versions {state['versions'] or 'none'} "
        f"(of FAILED runs: {sorted(half) or 'none'}); aliases {state['aliases'] or 'none'}",
    )
    assert statuses == ["FAILED"]
    assert state["aliases"] == {}, "an alias points at a version of a failed run"
    assert half == {}, (
        f"version(s) {sorted(half)} of the FAILED run stay registered (no alias, no gate "
        "record): a half-registered version"
    )


# --------------------------------------------------------------------------- concurrency


def test_two_runs_at_once_both_finish_and_stay_consistent(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, tmp_path, record, helpers
) -> None:
    from flows.lineage import data_lineage
    from flows.params import load_params

    ws = pipeline_workspace("concurrent")
    data_before = helpers.tree_digest(ws / "data")
    lock_before = (ws / "dvc.lock").read_text()
    env = helpers.child_env(
        PREFECT_API_URL=prefect_harness,
        MLFLOW_TRACKING_USERNAME="pipeline-bot",
        MLFLOW_TRACKING_PASSWORD=CANARY,
    )
    exe = str(helpers.bin_dir / "vae-pipeline")
    seeds = {"A": 1, "B": 2}
    procs, logs = {}, {}
    t0 = time.monotonic()
    for name, seed in seeds.items():
        logs[name] = (tmp_path / f"{name}.out", tmp_path / f"{name}.err")
        procs[name] = subprocess.Popen(
            [exe, "run", "--workdir", str(ws), "-S", f"train.seed={seed}"],
            cwd=tmp_path,
            env=env,
            stdout=logs[name][0].open("wb"),
            stderr=logs[name][1].open("wb"),
            stdin=subprocess.DEVNULL,
        )
    rcs = {name: p.wait(600) for name, p in procs.items()}
    seconds = time.monotonic() - t0
    outs = {n: logs[n][0].read_text(errors="replace") for n in procs}
    errs = {n: logs[n][1].read_text(errors="replace") for n in procs}
    for name, rc in rcs.items():
        assert rc == 0, f"run {name} exited {rc}:\n{errs[name][-3000:]}"
    results = {n: json.loads(outs[n][outs[n].index("{") :]) for n in procs}

    client = client_for(ws)
    lineage = data_lineage(ws)
    state = registry_state(ws)
    runs = {n: client.get_run(results[n]["run_id"]) for n in procs}
    order = sorted(procs, key=lambda n: runs[n].info.start_time)
    first, second = runs[order[0]].info, runs[order[1]].info
    serialized = first.end_time <= second.start_time
    problems = []
    for name, run in runs.items():
        version = results[name]["model"]["version"]
        mv = client.get_model_version(MODEL, version)
        tags = dict(mv.tags)
        params = load_params(ws / "params.yaml", [f"train.seed={seeds[name]}"])
        expected = {
            "mlflow.run_id": run.info.run_id,
            "dvc.processed_md5": lineage["processed_md5"],
            "dvc.raw_md5": lineage["raw_md5"],
            "params.hash": params.hash(),
        }
        if mv.run_id != run.info.run_id:
            problems.append(f"v{version} points at run {mv.run_id}, not {run.info.run_id}")
        for key, value in expected.items():
            if tags.get(key) != value or run.data.tags.get(key, value) != value:
                problems.append(f"v{version} {key}={tags.get(key)!r}, expected {value!r}")
        if run.data.params.get("train.seed") != str(seeds[name]):
            problems.append(f"run {name} logged train.seed={run.data.params.get('train.seed')}")
        if run.info.status != "FINISHED":
            problems.append(f"run {name} is {run.info.status}")
    status = helpers.run_dvc(ws, "status", "--json")
    # The source stage is always re-run (it fingerprints data.source); nothing else may differ.
    changed = json.loads(status.stdout or "{}") if status.returncode == 0 else None
    dvc_clean = changed is not None and set(changed) <= {"source"}
    final_seed = yaml.safe_load((ws / "params.yaml").read_text())["train"]["seed"]
    leaked = [
        str(p.relative_to(ws))
        for p in ws.rglob("*")
        if p.is_file()
        and ".git" not in p.parts
        and ".dvc" not in p.parts
        and CANARY.encode() in p.read_bytes()
    ] + [f"{n} output" for n in procs if CANARY in outs[n] + errs[n]]
    record(
        "fault: two runs at the same moment",
        "two `vae-pipeline run` processes (-S train.seed=1 / =2) started together on one "
        "workspace against one Prefect API, MLFLOW_TRACKING_PASSWORD set to a canary",
        f"both exit 0 in {seconds:.0f} s, {'one after the other' if serialized else 'OVERLAPPING'}"
        f"; versions {sorted(state['versions'])} with runs {len(set(state['versions'].values()))} "
        f"distinct; lineage problems: {problems or 'none'}; dvc status "
        f"{'clean' if dvc_clean else 'DIRTY'}, dvc.lock "
        f"{'unchanged' if (ws / 'dvc.lock').read_text() == lock_before else 'changed'}, data "
        f"{'unchanged' if helpers.tree_digest(ws / 'data') == data_before else 'CHANGED'}; "
        f"params.yaml ends with the last run's seed ({final_seed}); canary found in: "
        f"{leaked or 'nothing'}",
    )
    assert sorted(state["versions"]) == ["1", "2"]
    assert len(set(state["versions"].values())) == 2
    assert {results[n]["model"]["version"] for n in procs} == {"1", "2"}
    assert problems == []
    assert serialized, "the two runs overlapped: the workspace lock did not serialise them"
    assert dvc_clean, status.stdout + status.stderr
    assert (ws / "dvc.lock").read_text() == lock_before
    assert helpers.tree_digest(ws / "data") == data_before
    assert final_seed == seeds[order[1]]
    assert lock_is_free(ws)
    assert leaked == [], f"the credential canary reached {leaked}"
