"""Faults in a real pipeline run (the session's Prefect API, MLflow's SQLite store in a
throw-away git + DVC workspace, the real `dvc` CLI): a NaN loss, MLflow unreachable or dropping
out during registration, and two `vae-pipeline run` at once on one workspace."""

import contextlib
import io
import json
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from filelock import FileLock, Timeout
from helpers import bin_path, child_env, free_port, run_dvc, tree_digest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

import vae_core.training.trainer as trainer_mod
from flows.cli import main
from flows.lineage import data_lineage
from flows.params import load_params

pytestmark = pytest.mark.slow

MODEL = "mnist-vae"
EXPERIMENT = "vae-mnist"
CANARY = "canary-s3cr3t-8d1f0c"


def client_for(ws: Path):
    return MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")


def registry_state(ws: Path) -> dict:
    """{"versions": {version: run_id}, "aliases": {alias: version}} of the workspace's model."""
    client = client_for(ws)
    versions = {str(v.version): v.run_id for v in client.search_model_versions(f"name='{MODEL}'")}
    aliases = client.get_registered_model(MODEL).aliases if versions else {}
    return {"versions": versions, "aliases": {k: str(v) for k, v in aliases.items()}}


def runs_of(ws: Path) -> list:
    client = client_for(ws)
    exp = client.get_experiment_by_name(EXPERIMENT)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def lock_is_free(ws: Path) -> bool:
    try:
        with FileLock(str(ws / ".vae-pipeline.lock"), timeout=0):
            return True
    except Timeout:
        return False


def workspace_state(ws: Path) -> dict:
    """params.yaml, dvc.lock and data/ of ``ws``, and whether its pipeline lock is free."""
    files = {n: (ws / n).read_bytes() for n in ("params.yaml", "dvc.lock")}
    return files | {"data": tree_digest(ws / "data"), "lock free": lock_is_free(ws)}


def run_cli(argv: list[str]) -> tuple[int | None, str, BaseException | None, float]:
    """`vae-pipeline ARGV` in-process: (exit status or None, stderr, uncaught exception, s).

    stderr goes to a StringIO that is never closed, not to capsys: Prefect's log handlers keep
    the stream they first saw, and a closed capsys stream breaks the next flow run's logging.
    """
    err, t0, rc, exc = io.StringIO(), time.monotonic(), None, None
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except BaseException as e:  # uncaught: what a user would see as a traceback
            exc = e
    return rc, err.getvalue(), exc, time.monotonic() - t0


@pytest.fixture(scope="module")
def nan_run(prefect_harness, isolated_mlflow_uri, module_workspace):
    """One pipeline run whose training loss turns NaN in epoch 2 (of 2)."""
    ws = module_workspace("nan")
    before = workspace_state(ws)
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
        rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws), "-S", "train.epochs=2"])
    return SimpleNamespace(ws=ws, rc=rc, exc=exc, err=err, before=before, s=seconds)


def test_nan_loss_fails_the_run_and_registers_nothing(nan_run, record) -> None:
    client, runs = client_for(nan_run.ws), runs_of(nan_run.ws)
    run = runs[0] if runs else None
    reason = run.data.tags.get("failure.reason", "") if run else ""
    history = client.get_metric_history(run.info.run_id, "val/neg_elbo") if run else []
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)] if run else []
    state = registry_state(nan_run.ws)
    errors = [ln for ln in nan_run.err.splitlines() if ln.startswith("error: ")]
    record(
        "fault: NaN loss",
        "`vae-pipeline run -S train.epochs=2` (in-process), training loss NaN from epoch 2",
        f"exit {nan_run.rc} after {nan_run.s:.0f} s: "
        f"{record.short(errors[0]) if errors else repr(nan_run.exc)!r}; runs "
        f"{[r.info.status for r in runs]}, reason {record.short(reason, 80)!r}; val -ELBO at "
        f"{[m.step for m in history]}; registry {state}; model logged: {'model' in artifacts}",
    )
    assert nan_run.exc is None, f"uncaught {nan_run.exc!r}"
    assert nan_run.rc == 2 and errors, nan_run.err[-2000:]
    assert "training loss became nan at epoch 2" in errors[0]
    assert len(runs) == 1 and run.info.status == "FAILED"
    assert reason.startswith("NonFiniteLossError") and "nan" in reason and "epoch 2" in reason
    assert [m.step for m in history] == [1]
    assert state == {"versions": {}, "aliases": {}}
    assert "model" not in artifacts


def test_failed_run_leaves_the_workspace_as_it_was(nan_run, record) -> None:
    after = workspace_state(nan_run.ws)
    changed = [k for k, v in after.items() if v != nan_run.before[k]]
    record(
        "fault: NaN loss (workspace)",
        "params.yaml, dvc.lock, data/ and the workspace lock compared with before the run",
        f"changed: {changed or 'nothing'}",
    )
    # A failed run must not leave its overrides in params.yaml: the next run without overrides
    # (the nightly schedule) would silently reuse them.
    assert changed == [] and after["lock free"], f"changed: {changed}"


def test_mlflow_unreachable_is_a_clear_error_and_registers_nothing(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, monkeypatch, record
) -> None:
    ws = pipeline_workspace("mlflow-down")
    store_before, mlruns_before = (ws / "mlflow.db").read_bytes(), tree_digest(ws / "mlruns")
    port = free_port()  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws), "-S", "train.epochs=1"])
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    shown = record.short(errors[0]) if errors else f"uncaught {type(exc).__name__}: {exc}"
    store_same = (ws / "mlflow.db").read_bytes() == store_before
    mlruns_same, trained = tree_digest(ws / "mlruns") == mlruns_before, (ws / "runs").exists()
    record(
        "fault: MLflow unreachable",
        f"`vae-pipeline run` (in-process), MLFLOW_TRACKING_URI={uri} (closed port), no retries",
        f"exit {rc} after {seconds:.0f} s: {record.short(shown, 130)!r}; mlflow.db, mlruns/ "
        f"same: {store_same}, {mlruns_same}; trained: {trained}; lock free: {lock_is_free(ws)}",
    )
    assert store_same and mlruns_same
    assert registry_state(ws) == {"versions": {}, "aliases": {}}
    assert not trained, "training ran although nothing could be tracked"
    assert lock_is_free(ws)
    assert exc is None, f"the CLI let {exc!r} escape (a traceback) instead of one `error:` line"
    assert rc == 2 and errors and f"127.0.0.1:{port}" in errors[0], err[-2000:]


def test_mlflow_outage_during_registration_leaves_no_half_registered_version(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, monkeypatch, record
) -> None:
    ws = pipeline_workspace("mlflow-drop")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def outage(self, *args, **kwargs):
        url = "http://tracking.example:5000/api/2.0/mlflow/registered-models/alias"
        raise MlflowException(f"API request to {url} failed with exception ConnectionError")

    # The version is created (register_model), then the backend goes away before the alias.
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", outage)
    rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws), "-S", "train.epochs=1"])
    monkeypatch.undo()
    state, runs = registry_state(ws), runs_of(ws)
    statuses = [r.info.status for r in runs]
    failed_ids = {r.info.run_id for r in runs if r.info.status == "FAILED"}
    half = {v: r for v, r in state["versions"].items() if r in failed_ids}
    err_line = next((ln for ln in err.splitlines() if ln.startswith("error: ")), repr(exc))
    record(
        "fault: MLflow drops during registration",
        "pipeline run whose tracking backend refuses connections once the model version is "
        "created, before its alias is set",
        f"exit {rc} after {seconds:.0f} s ({record.short(err_line, 90)!r}); runs {statuses}; "
        f"registry {state}; versions of FAILED runs: {sorted(half) or 'none'}",
    )
    # It failed because of the outage, with one line naming the server, and for no other reason.
    assert exc is None and rc not in (0, None), (rc, exc, err[-2000:])
    assert "tracking.example:5000" in err_line, err_line
    assert statuses == ["FAILED"]
    assert state["aliases"] == {}, "an alias points at a version of a failed run"
    assert half == {}, (
        f"version(s) {sorted(half)} of the FAILED run stay registered (no alias, no gate "
        "record): a half-registered version"
    )


def test_two_runs_at_once_both_finish_and_stay_consistent(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, tmp_path, record
) -> None:
    ws = pipeline_workspace("concurrent")
    before = workspace_state(ws)
    credentials = {"MLFLOW_TRACKING_USERNAME": "pipeline-bot", "MLFLOW_TRACKING_PASSWORD": CANARY}
    env = child_env(PREFECT_API_URL=prefect_harness, **credentials)
    seeds, t0 = {"A": 1, "B": 2}, time.monotonic()
    cmd = [bin_path("vae-pipeline"), "run", "--workdir", str(ws), "-S"]
    procs = {
        n: subprocess.Popen(
            [*cmd, f"train.seed={seed}"], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
            stdout=(tmp_path / f"{n}.out").open("wb"), stderr=(tmp_path / f"{n}.err").open("wb"),
        )
        for n, seed in seeds.items()
    }  # fmt: skip
    rcs = {name: p.wait(600) for name, p in procs.items()}
    seconds = time.monotonic() - t0
    outs = {n: (tmp_path / f"{n}.out").read_text(errors="replace") for n in procs}
    errs = {n: (tmp_path / f"{n}.err").read_text(errors="replace") for n in procs}
    for name, rc in rcs.items():
        assert rc == 0, f"run {name} exited {rc}:\n{errs[name][-3000:]}"
    results = {n: json.loads(outs[n][outs[n].index("{") :]) for n in procs}

    client, lineage, state = client_for(ws), data_lineage(ws), registry_state(ws)
    runs = {n: client.get_run(results[n]["run_id"]) for n in procs}
    order = sorted(procs, key=lambda n: runs[n].info.start_time)
    serialized = runs[order[0]].info.end_time <= runs[order[1]].info.start_time
    problems = []
    for name, run in runs.items():
        version = results[name]["model"]["version"]
        mv = client.get_model_version(MODEL, version)
        tags = dict(mv.tags)
        expected = {
            "mlflow.run_id": run.info.run_id,
            "dvc.processed_md5": lineage["processed_md5"],
            "dvc.raw_md5": lineage["raw_md5"],
            "params.hash": load_params(ws / "params.yaml", [f"train.seed={seeds[name]}"]).hash(),
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
    status = run_dvc(ws, "status", "--json")
    # The source stage is always re-run (it fingerprints data.source); nothing else may differ.
    stale = json.loads(status.stdout or "{}") if status.returncode == 0 else None
    dvc_clean = stale is not None and set(stale) <= {"source"}
    final_seed = yaml.safe_load((ws / "params.yaml").read_text())["train"]["seed"]
    after = workspace_state(ws)
    files = [p for p in ws.rglob("*") if p.is_file() and not {".git", ".dvc"} & set(p.parts)]
    leaked = [str(p.relative_to(ws)) for p in files if CANARY.encode() in p.read_bytes()]
    leaked += [f"{n} output" for n in procs if CANARY in outs[n] + errs[n]]
    changed = [k for k in ("dvc.lock", "data") if after[k] != before[k]]
    record(
        "fault: two runs at the same moment",
        "two `vae-pipeline run -S train.seed=1|2` processes at once on one workspace, "
        "MLFLOW_TRACKING_PASSWORD set to a canary",
        f"both exit 0 in {seconds:.0f} s, serialised: {serialized}; registry {state}; lineage "
        f"problems: {problems or 'none'}; dvc status clean: {dvc_clean}; changed: "
        f"{changed or 'nothing'}; final seed {final_seed}; canary in: {leaked or 'nothing'}",
    )
    assert sorted(state["versions"]) == ["1", "2"]
    assert len(set(state["versions"].values())) == 2
    assert {results[n]["model"]["version"] for n in procs} == {"1", "2"}
    assert problems == []
    assert serialized, "the two runs overlapped: the workspace lock did not serialise them"
    assert dvc_clean, status.stdout + status.stderr
    assert changed == [] and after["lock free"], changed
    assert final_seed == seeds[order[1]]
    assert leaked == [], f"the credential canary reached {leaked}"
