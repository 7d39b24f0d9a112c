"""The team stack for real (`python -m flows.team_stack up|down`): PostgreSQL, an MLflow server
on it with proxied artifacts and basic auth, a Prefect server on it; a pipeline worker that
knows only the servers' addresses and its account from the environment; a reader account.

Started once for the module (about 20 s), stopped at its end. Run alone with
`pytest -m team_stack`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.team_stack]

MODEL = "mnist-vae"


def _psql(stack, db: str, sql: str) -> str:
    """One query against the stack's PostgreSQL, as the database's owner."""
    from flows.team_stack import HOST, _pg_bin

    password = stack.credentials[f"PG_{db.upper()}_PASSWORD"]
    done = subprocess.run(
        [_pg_bin("psql"), "-h", HOST, "-p", str(stack.pg_port), "-U", db, "-d", db, "-tAc", sql],
        capture_output=True, text=True, env={"PGPASSWORD": password, "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from flows import team_stack

    root = tmp_path_factory.mktemp("team-stack")
    started = team_stack.up(root)
    yield started
    team_stack.down(root)
    shutil.rmtree(started.pg_dir, ignore_errors=True)  # `down` keeps the data; a test does not


def _worker(stack, ws: Path, overrides: list[str], proc_tools) -> dict:
    """`vae-pipeline run` in workspace `ws`, as the service account, over the stack: what a
    Prefect worker on another machine does. Returns the JSON the command prints."""
    from flows.team_stack import account_env

    env = proc_tools.env(**account_env(stack, "pipeline"))
    cmd = [proc_tools.bin_path("vae-pipeline"), "run"]
    for override in overrides:
        cmd += ["-S", override]
    done = subprocess.run(cmd, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout[done.stdout.index("{") :])


@pytest.fixture(scope="module")
def worker_run(stack, workspace_factory, tiny_overrides, proc_tools) -> SimpleNamespace:
    """Worker A trains one epoch (version 1, champion); worker B, another clone, trains two
    (version 2, promoted over A's by the gate); then the service account registers a copy of
    version 1 as version 3, something a person might promote by hand."""
    from flows.team_stack import account_env

    ws = workspace_factory("worker-a")
    result = _worker(stack, ws, tiny_overrides, proc_tools)
    ws_b = workspace_factory("worker-b")
    result_b = _worker(stack, ws_b, [*tiny_overrides, "train.epochs=2"], proc_tools)
    env = proc_tools.env(**account_env(stack, "pipeline"))
    # A second version of the same model, registered by the service account: what a person
    # might want to promote by hand.
    second = subprocess.run(
        [sys.executable, "-c",
         "from mlflow import MlflowClient; c = MlflowClient(); "
         f"v = c.get_model_version({MODEL!r}, '1'); "
         "mid = v.source.removeprefix('models:/'); "
         f"v2 = c.create_model_version({MODEL!r}, v.source, run_id=v.run_id, model_id=mid); "
         "print(v2.version)"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert second.stdout.strip() == "3", second.stderr[-2000:]
    return SimpleNamespace(ws=ws, result=result, ws_b=ws_b, result_b=result_b, env=env)


def _as(stack, account: str, code: str, proc_tools) -> subprocess.CompletedProcess:
    """Python code run in a process that has only `account`'s environment."""
    from flows.team_stack import account_env

    env = proc_tools.env(**account_env(stack, account))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_servers_keep_their_state_in_postgresql(stack, worker_run) -> None:
    run_id = worker_run.result["run_id"]
    assert _psql(stack, "mlflow", f"select status from runs where run_uuid = '{run_id}'") == (
        "FINISHED"
    )
    assert _psql(stack, "mlflow", "select count(*) from model_versions") == "3"
    users = _psql(stack, "mlflow_auth", "select username from users order by username")
    assert users.split() == ["admin", "pipeline", "reader"]
    flow_runs = _psql(
        stack, "prefect", "select count(*) from flow_run where state_type = 'COMPLETED'"
    )
    assert int(flow_runs) >= 1
    # The artifacts went through the server into its own store (the worker needs no storage).
    assert any((Path(stack.root) / "artifacts").rglob("model.safetensors"))
    assert not (worker_run.ws / "mlruns").exists() and not (worker_run.ws_b / "mlruns").exists()


def test_the_service_account_trained_registered_and_promoted(stack, worker_run) -> None:
    assert worker_run.result["model"] == {"name": MODEL, "version": "1"}
    assert worker_run.result["gate"]["decision"] == "promote"


def test_two_workers_one_experiment_and_the_gate_between_them(
    stack, worker_run, proc_tools
) -> None:
    """Worker B's version is gated against worker A's champion and promoted; both runs are in
    one experiment, each naming its own workspace."""
    b = worker_run.result_b
    assert b["model"] == {"name": MODEL, "version": "2"}
    assert b["gate"]["decision"] == "promote", b["gate"]["reason"]
    assert b["gate"]["champion_before"] == "1"
    code = (
        "import json; from mlflow import MlflowClient; c = MlflowClient(); "
        f"runs = [c.get_run(r) for r in ({worker_run.result['run_id']!r}, {b['run_id']!r})]; "
        "print(json.dumps([[r.info.experiment_id, r.data.tags['workspace']] for r in runs] + "
        f"[c.get_model_version_by_alias({MODEL!r}, 'champion').version]))"
    )
    done = _as(stack, "reader", code, proc_tools)
    assert done.returncode == 0, done.stderr[-2000:]
    (exp_a, ws_a), (exp_b, ws_b), champion = json.loads(done.stdout)
    assert exp_a == exp_b and champion == "2"
    assert ws_a.endswith(str(worker_run.ws.resolve())) and ws_b.endswith(
        str(worker_run.ws_b.resolve())
    )


def test_credentials_are_never_written_down(stack, worker_run, proc_tools) -> None:
    """Not in params.yaml, not in the tracking URI, not in any tag or param of the run."""
    secret = stack.credentials["MLFLOW_PIPELINE_PASSWORD"]
    assert secret not in (worker_run.ws / "params.yaml").read_text()
    code = (
        "import json; from mlflow import MlflowClient; c = MlflowClient(); "
        f"r = c.get_run({worker_run.result['run_id']!r}); "
        "print(json.dumps([c.tracking_uri, r.data.tags, r.data.params, "
        f"c.get_model_version({MODEL!r}, '1').tags]))"
    )
    done = _as(stack, "reader", code, proc_tools)
    assert done.returncode == 0, done.stderr[-2000:]
    assert secret not in done.stdout and "pipeline" not in json.loads(done.stdout)[0]


def test_the_reader_sees_runs_and_versions(stack, worker_run, proc_tools) -> None:
    code = (
        "from mlflow import MlflowClient; c = MlflowClient(); "
        f"print(c.get_run({worker_run.result['run_id']!r}).info.status, "
        f"c.get_model_version_by_alias({MODEL!r}, 'champion').version)"
    )
    done = _as(stack, "reader", code, proc_tools)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["FINISHED", "2"]


def test_the_reader_cannot_move_the_champion_or_delete_a_version(
    stack, worker_run, proc_tools
) -> None:
    """Refused by the server's permissions, each with one line naming the account and the
    permission it lacks; the alias and the version are as they were."""
    code = (
        "import sys\n"
        "from mlflow import MlflowClient\n"
        "from flows.tracking import permission_refusal\n"
        "c = MlflowClient()\n"
        "for act in (lambda: c.set_registered_model_alias('mnist-vae', 'champion', '3'),\n"
        "            lambda: c.delete_model_version('mnist-vae', '1')):\n"
        "    try:\n"
        "        act()\n"
        "        print('allowed')\n"
        "    except Exception as exc:\n"
        "        print(permission_refusal(exc))\n"
    )
    done = _as(stack, "reader", code, proc_tools)
    assert done.returncode == 0, done.stderr[-2000:]
    alias_line, delete_line = done.stdout.strip().splitlines()
    assert alias_line == (
        "MLflow account 'reader' may not move an alias of a registered model: it needs EDIT "
        "permission on that resource (ask an admin of the tracking server)"
    )
    assert delete_line.startswith("MLflow account 'reader' may not delete a model version: it ")
    assert "needs MANAGE permission" in delete_line
    check = _as(
        stack,
        "pipeline",
        "from mlflow import MlflowClient; c = MlflowClient(); "
        f"print(c.get_model_version_by_alias({MODEL!r}, 'champion').version, "
        f"len(c.search_model_versions(\"name='{MODEL}'\")))",
        proc_tools,
    )
    assert check.stdout.split() == ["2", "3"], check.stderr[-2000:]


def test_a_refused_cli_action_is_one_line(stack, worker_run, proc_tools) -> None:
    """`vae-pipeline promote 3` by the reader: exit 2, one `error:` line naming the account
    and the permission, no traceback; the champion stays, no registry lock is left behind."""
    from flows.team_stack import account_env

    env = proc_tools.env(**account_env(stack, "reader"))
    cmd = [proc_tools.bin_path("vae-pipeline"), "promote", "3", "--reason", "a reader tries"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=worker_run.ws)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("error: MLflow account 'reader' may not move an alias")
    assert "needs EDIT permission" in errors[0] and "Traceback" not in done.stderr
    check = _as(
        stack,
        "pipeline",
        "from mlflow import MlflowClient; c = MlflowClient(); "
        f"print(c.get_model_version_by_alias({MODEL!r}, 'champion').version, "
        "sorted(m.name for m in c.search_registered_models()))",
        proc_tools,
    )
    assert check.stdout.strip() == f"2 ['{MODEL}']", check.stderr[-2000:]


def test_without_credentials_nothing_is_served(stack) -> None:
    import urllib.error
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        )
    assert refused.value.code == 401
