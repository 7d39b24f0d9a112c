"""The team stack for real (`python -m flows.team_stack up|down`): PostgreSQL, MLflow on it with
proxied artifacts and basic auth, Prefect on it with the process pool `team-process`, a folder
as the DVC remote `shared`. Two clones, each a process worker with its own workspace, run the
deployment `team-nightly`; then the faults, each at a point the system reports, never on a
timer: a worker killed while its run trains, PostgreSQL restarted while a sweep runs. One test,
in order (each step depends on the registry the previous one left); `pytest -m team_stack`."""

import json
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import bin_path, child_env, kill_tree, prefect_api, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.team_stack]

MODEL = "mnist-vae"
DEPLOYMENT = "training-pipeline/team-nightly"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
JOURNAL = ".vae-pipeline.journal.json"
RUN_TIMEOUT_S = 900  # one tiny run is ~1-2 min on two busy cores
#: Two trials: one of one epoch, finished long before the other (forty) is: the restart of
#: PostgreSQL lands between them.
SWEEP = """sweep:
  name: team
  method: grid
  metric: val/best_neg_elbo
  parameters:
    train.epochs: [1, 20]
"""


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


def _prefect(stack, method: str, path: str, body: dict | None = None):
    """One call to the Prefect server's REST API."""
    return prefect_api(SimpleNamespace(api=stack.prefect_api), method, path, body)


def _logs_with(stack, flow_run_id: str, *prefixes: str) -> list[str]:
    """The flow run's logs (what the Prefect UI shows on its page) once a line starting with
    each prefix is there: a run's last lines reach the server shortly after its final state."""
    seen: list[str] = []

    def ready():
        seen.clear()
        while len(seen) % 200 == 0:  # the API answers 200 lines at most: page through
            body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"}
            page = _prefect(stack, "POST", "/logs/filter", body | {"offset": len(seen)})
            seen.extend(entry["message"] for entry in page)
            if not page:
                break
        return all(any(line.startswith(p) for line in seen) for p in prefixes) and list(seen)

    try:
        return wait_for(f"log lines {prefixes} of flow run {flow_run_id}", ready, timeout_s=120)
    except pytest.fail.Exception:
        pytest.fail(f"flow run {flow_run_id} logged no {prefixes}; its log:\n" + "\n".join(seen))


def _as(stack, account: str, code: str) -> subprocess.CompletedProcess:
    """Python code run in a process that has only `account`'s environment."""
    from flows.team_stack import account_env

    env = child_env(**account_env(stack, account))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _read(stack, code: str, account: str = "reader"):
    """JSON printed by MLflow client code run as `account` (default: the reader)."""
    prelude = "import json; from mlflow import MlflowClient; c = MlflowClient()\n"
    done = _as(stack, account, prelude + code)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _mlflow_runs(stack, flow_run_id: str) -> list[dict]:
    """The MLflow runs a flow run made (lineage tag `prefect.flow_run_id`), as the reader."""
    return _read(stack, (
        "runs = c.search_runs([c.get_experiment_by_name('vae-mnist').experiment_id], "
        f"filter_string=\"tags.`prefect.flow_run_id` = '{flow_run_id}'\")\n"
        "print(json.dumps([dict(run_id=r.info.run_id, status=r.info.status, tags=r.data.tags, "
        "versions=[v.version for v in c.search_model_versions(f\"run_id = '{r.info.run_id}'\")]) "
        "for r in runs]))"
    ))  # fmt: skip


def _champion(stack) -> str:
    return _read(stack, f"print(json.dumps(c.get_model_version_by_alias({MODEL!r}, 'champion')"
                 ".version))")  # fmt: skip


def _snapshot(ws: Path) -> dict[str, bytes]:
    return {name: (ws / name).read_bytes() for name in ("params.yaml", "dvc.lock")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from flows import team_stack

    root = tmp_path_factory.mktemp("team-stack")
    started = team_stack.up(root)
    yield started
    team_stack.down(root)
    shutil.rmtree(started.pg_dir, ignore_errors=True)  # `down` keeps the data; a test does not


def test_two_clones_one_deployment_a_killed_worker_a_database_restart_and_the_reader(
    stack, workspace_factory, tmp_path_factory, tiny_overrides, start_process
) -> None:
    from flows.team_stack import WORK_POOL, account_env

    # Two clones with the remote `shared` configured, `team-nightly` deployed from the first.
    ws_a, ws_b = workspace_factory("clone-a"), workspace_factory("clone-b")
    cli_env = child_env(
        PREFECT_API_URL=stack.prefect_api, PREFECT_HOME=str(tmp_path_factory.mktemp("cli-home"))
    )
    dvc, prefect = bin_path("dvc"), bin_path("prefect")
    for ws in (ws_a, ws_b):
        cmd = [dvc, "remote", "add", "--local", "shared", stack.dvc_remote]
        subprocess.run(cmd, cwd=ws, env=cli_env, check=True, capture_output=True)
    done = subprocess.run(
        [prefect, "--no-prompt", "deploy", "--name", "team-nightly"],
        cwd=ws_a, env=cli_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    deployment = _prefect(stack, "GET", f"/deployments/name/{DEPLOYMENT}")

    def start_worker(name: str, ws: Path):
        env = child_env(
            **account_env(stack, "pipeline"),
            VAE_WORKSPACE=str(ws),
            PREFECT_HOME=str(tmp_path_factory.mktemp(f"{name}-home")),
            PREFECT_WORKER_QUERY_SECONDS="1",
        )
        cmd = [prefect, "worker", "start", "--pool", WORK_POOL, "--name", name, "--limit", "1"]
        return start_process(name, cmd, env=env, cwd=ws)

    def submit(parameters: dict) -> str:
        path = f"/deployments/{deployment['id']}/create_flow_run"
        return _prefect(stack, "POST", path, {"parameters": parameters})["id"]

    def finish(flow_run_id: str, worker) -> dict:
        def ended():
            run = _prefect(stack, "GET", f"/flow_runs/{flow_run_id}")
            return run["state_type"] in FINAL and run

        return wait_for(f"flow run {flow_run_id} to end", ended, RUN_TIMEOUT_S, worker, 0.5)

    # The Prefect UI's pages fetch from this server's API, not Prefect's default
    # http://127.0.0.1:4200/api (seen: a blank page saying it cannot connect); MLflow serves
    # nothing without credentials.
    base = stack.prefect_api.removesuffix("/api")
    with urllib.request.urlopen(f"{base}/ui-settings", timeout=30) as resp:
        assert json.loads(resp.read())["api_url"] == stack.prefect_api
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        )
    assert refused.value.code == 401
    # The classifier keeps its committed settings, so that the stage outputs worker A pushes
    # are the ones the committed dvc.lock names (DVC's run cache skips stages with persistent
    # outputs, so a stage run with other parameters is run again in every clone).
    tiny = [o for o in tiny_overrides if not o.startswith("classifier.")]
    # 1. Worker A (only A is up) takes the first run: it prepares the data and pushes them.
    worker_a = start_worker("worker-a", ws_a)
    fr_a = finish(submit({"overrides": tiny}), worker_a)
    # A run's last log lines reach the server shortly after its final state: stopping its
    # worker (SIGTERM to the group) before they arrived lost them once.
    logs_a = _logs_with(stack, fr_a["id"], "dvc repro ran: ", "dvc push -r shared: ")
    worker_a.stop()
    # What `git pull` brings clone B: the dvc.lock A's run wrote, which a team commits. It names
    # the exact outputs A pushed (the classifier's bytes are not the same on every run, so the
    # lock committed in the repository may name outputs no one pushed).
    shutil.copy2(ws_a / "dvc.lock", ws_b / "dvc.lock")
    git = ["git", "-c", "user.name=worker-a", "-c", "user.email=a@localhost"]
    subprocess.run(
        [*git, "commit", "-qam", "dvc.lock from A", "--allow-empty"], cwd=ws_b, check=True
    )
    # 2. Worker B, another clone, takes the second: it pulls the data, trains two epochs, and
    #    the gate promotes its version over A's. Each MLflow run (one experiment) names the
    #    clone of the worker that ran it.
    worker_b = start_worker("worker-b", ws_b)
    fr_b = finish(submit({"overrides": [*tiny, "train.epochs=2"]}), worker_b)
    run_ids = []
    for flow_run, ws, version in ((fr_a, ws_a, "1"), (fr_b, ws_b, "2")):
        assert flow_run["state_type"] == "COMPLETED"
        assert flow_run["deployment_id"] == deployment["id"]
        (run,) = _mlflow_runs(stack, flow_run["id"])
        assert run["status"] == "FINISHED" and run["versions"] == [version]
        assert run["tags"]["prefect.deployment"] == "team-nightly"
        assert run["tags"]["workspace"].endswith(str(ws.resolve()))
        assert run["tags"]["gate.decision"] == "promote"
        run_ids.append(run["run_id"])
    assert _champion(stack) == "2"
    # The servers keep their state in PostgreSQL and the artifacts in the server's store.
    status = _psql(stack, "mlflow", f"select status from runs where run_uuid = '{run_ids[0]}'")
    assert status == "FINISHED"
    users = _psql(stack, "mlflow_auth", "select username from users order by username")
    assert users.split() == ["admin", "pipeline", "reader"]
    assert any((Path(stack.root) / "artifacts").rglob("model.safetensors"))
    # The data reached B through the DVC remote: B's run re-ran no stage but the fingerprint
    # of the source (which always runs).
    logs_b = _logs_with(stack, fr_b["id"], "dvc repro ran: ", "dvc pull -r shared: ")
    assert "dvc repro ran: source, prepare, classifier" in logs_a
    assert any(line.startswith("dvc push -r shared: ") and "pushed" in line for line in logs_a)
    assert any(line.startswith("dvc pull -r shared: ") and "fetched" in line for line in logs_b)
    ran_b = [line for line in logs_b if line.startswith("dvc repro")]
    assert ran_b == ["dvc repro fetch ran: source", "dvc repro ran: source"], logs_b
    assert any(Path(stack.dvc_remote).rglob("*"))

    # 3. Worker B dies (with its flow run) once the run reports its first epoch to MLflow.
    #    Nobody tells the servers, and the clone holds the dead run's params.yaml and journal.
    before_kill = _snapshot(ws_b)
    killed = submit({"overrides": [*tiny, "train.epochs=200"]})
    epoch_logged = partial(  # "1" once the run logged an epoch, "" before
        _psql, stack, "mlflow",
        "select 1 from metrics m join tags t on t.run_uuid = m.run_uuid where t.key = "
        f"'prefect.flow_run_id' and t.value = '{killed}' and m.key = 'val/neg_elbo' limit 1",
    )  # fmt: skip
    wait_for("the doomed run's first epoch", epoch_logged, RUN_TIMEOUT_S, worker_b, every_s=0.5)
    assert len(kill_tree(worker_b.popen.pid)) >= 2  # the worker and the flow run it started
    assert _prefect(stack, "GET", f"/flow_runs/{killed}")["state_type"] == "RUNNING"
    assert _snapshot(ws_b)["params.yaml"] != before_kill["params.yaml"]
    assert (ws_b / JOURNAL).is_file()
    (run,) = _mlflow_runs(stack, killed)
    assert run["status"] == "RUNNING"

    # 4. The worker comes back; the next run (the deployment's own parameters, as at 02:00)
    #    recovers the workspace, finds params.yaml as B's finished run left it, and so finds
    #    the data, the parameters and the code of version 2: nothing to train.
    worker_b2 = start_worker("worker-b-again", ws_b)
    fr_next = finish(submit({}), worker_b2)
    assert fr_next["state_type"] == "COMPLETED"
    logs = _logs_with(stack, fr_next["id"], "recovered the workspace", "up to date: ")
    worker_b2.stop()
    assert any(line.startswith("recovered the workspace from a dead run: ") for line in logs)
    assert any(line.startswith(f"up to date: {MODEL} v2 was made from") for line in logs), logs
    # The dead flow run is Crashed, saying why and by whom; its MLflow run failed, nothing
    # registered from it; params.yaml and dvc.lock are byte for byte as before, no journal.
    state = _prefect(stack, "GET", f"/flow_runs/{killed}")["state"]
    assert state["type"] == "CRASHED" and "died holding the workspace" in state["message"]
    assert fr_next["name"] in state["message"]
    (run,) = _mlflow_runs(stack, killed)
    assert run["status"] == "FAILED" and run["versions"] == []
    assert run["tags"]["failure.reason"].startswith("WorkerDied: its process died holding")
    assert _snapshot(ws_b) == before_kill
    assert not (ws_b / JOURNAL).is_file()
    completed = "select count(*) from flow_run where state_type = 'COMPLETED'"
    assert int(_psql(stack, "prefect", completed)) >= 3  # A's, B's, the recovering one

    # 5. A copy of version 1 by the service account, something a person might promote by hand;
    #    neither it nor the recovering run moved the champion. Then the sweep.
    copy_version = _read(
        stack,
        f"v = c.get_model_version({MODEL!r}, '1')\n"
        f"v2 = c.create_model_version({MODEL!r}, v.source, run_id=v.run_id, "
        "model_id=v.source.removeprefix('models:/'))\nprint(json.dumps(v2.version))",
        account="pipeline",
    )
    assert _champion(stack) == "2"
    _sweep_survives_a_database_restart(stack, ws_a, tiny, start_process)

    # 6. The reader reads runs and versions; the service account's password is not in
    #    params.yaml, the tracking URI, or any tag or param of a run or version.
    secret = stack.credentials["MLFLOW_PIPELINE_PASSWORD"]
    assert secret not in (ws_a / "params.yaml").read_text()
    seen = _read(
        stack,
        f"r = c.get_run({run_ids[0]!r})\n"
        "print(json.dumps([c.tracking_uri, r.data.tags, r.data.params, "
        f"c.get_model_version({MODEL!r}, '1').tags, c.get_run({run_ids[1]!r}).info.status, "
        f"c.get_model_version({MODEL!r}, '2').run_id]))",
    )
    assert secret not in json.dumps(seen) and "pipeline" not in seen[0]
    assert seen[4:] == ["FINISHED", run_ids[1]]
    # It may not move the champion or delete a version: refused by the server's permissions,
    # each with one line naming the account and the permission it lacks, through the client
    # and through `vae-pipeline promote` (exit 2, one `error:` line, no traceback).
    before, count = _champion(stack), "select count(*) from model_versions"
    versions = _psql(stack, "mlflow", count)
    code = (
        "from mlflow import MlflowClient\nfrom flows.tracking import permission_refusal\n"
        "c = MlflowClient()\n"
        f"for act in (lambda: c.set_registered_model_alias({MODEL!r}, 'champion', "
        f"{copy_version!r}), lambda: c.delete_model_version({MODEL!r}, '1')):\n"
        "    try:\n        act()\n        print('allowed')\n"
        "    except Exception as exc:\n        print(permission_refusal(exc))\n"
    )
    done = _as(stack, "reader", code)
    assert done.returncode == 0, done.stderr[-2000:]
    alias_line, delete_line = done.stdout.strip().splitlines()
    assert alias_line == (
        "MLflow account 'reader' may not move an alias of a registered model: it needs EDIT "
        "permission on that resource (ask an admin of the tracking server)"
    )
    assert delete_line.startswith("MLflow account 'reader' may not delete a model version: it ")
    assert "needs MANAGE permission" in delete_line
    cmd = [bin_path("vae-pipeline"), "promote", copy_version, "--reason", "a reader tries"]
    env = child_env(**account_env(stack, "reader"))
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ws_a)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("error: MLflow account 'reader' may not move an alias")
    assert "needs EDIT permission" in errors[0] and "Traceback" not in done.stderr
    assert _champion(stack) == before
    assert _psql(stack, "mlflow", count) == versions
    # The workers kept no tracking store of their own, to the end.
    for ws in (ws_a, ws_b):
        assert not (ws / "mlruns").exists() and not (ws / "mlflow.db").exists()


def _sweep_survives_a_database_restart(stack, ws_a: Path, tiny, start_process) -> None:
    """A sweep in clone A (two trials at once in threads; Dask itself is tested in
    tests/flows/test_sweep.py); PostgreSQL restarted once Prefect has its first trial's task
    Completed (all its MLflow writes done); the command run again if the first did not finish
    every trial. The first trial is kept as it was (same run, same end time), the other
    finishes, one parent run, one winner registered."""
    from flows import team_stack

    versions = "select count(*) from model_versions"
    versions_before = int(_psql(stack, "mlflow", versions))
    (ws_a / "team-sweep.yaml").write_text(SWEEP)
    env = child_env(**team_stack.account_env(stack, "pipeline"))
    cmd = [bin_path("vae-pipeline"), "sweep", "--sweep-file", "team-sweep.yaml"]
    cmd += ["--max-workers", "2", "--dvc-remote", "shared"]
    for override in tiny:
        cmd += ["-S", override]
    complete = (
        "select r.run_uuid, r.end_time from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'sweep.complete' and t.value = 'true' order by r.end_time"
    )
    trial_done = partial(  # "1" once it has, "" before
        _psql, stack, "prefect",
        "select 1 from task_run where name = 'trial-t00' and state_type = 'COMPLETED' limit 1",
    )  # fmt: skip
    sweep = start_process("sweep", cmd, env=env, cwd=ws_a)
    wait_for("the sweep's first trial to complete", trial_done, RUN_TIMEOUT_S, sweep, every_s=0.5)
    first = _psql(stack, "mlflow", complete).splitlines()[0].split("|")
    mlflow_log = Path(stack.root) / "logs" / "mlflow.log"
    log_before = len(mlflow_log.read_text(errors="replace").splitlines())
    team_stack.restart_postgres(Path(stack.root))
    returncode = sweep.popen.wait(RUN_TIMEOUT_S)
    after = mlflow_log.read_text(errors="replace").splitlines()[log_before:]
    answers = Counter(re.findall(r'HTTP/1\.1" (\d{3}) ', "\n".join(after)))  # the access log
    reruns = []
    if returncode != 0 or _psql(stack, "mlflow", complete).count("\n") < 1:
        again = subprocess.run(
            cmd, cwd=ws_a, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
        reruns.append(again)
    pg_log = (Path(stack.pg_dir) / "postgres.log").read_text(errors="replace")
    assert pg_log.count("database system is ready to accept connections") == 2  # start, restart
    assert returncode == 0 or all(r.returncode == 0 for r in reruns), sweep.tail(400)
    done = [line.split("|") for line in _psql(stack, "mlflow", complete).splitlines()]
    assert first in done and len(done) == 2
    children = _psql(
        stack, "mlflow",
        "select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'sweep.role' and t.value = 'trial'",
    )  # fmt: skip
    statuses = sorted(line.split("|")[1] for line in children.splitlines())
    assert statuses == ["FINISHED", "FINISHED"], children
    parents = "select count(*) from tags where key = 'sweep.role' and value = 'parent'"
    assert _psql(stack, "mlflow", parents) == "1"
    assert int(_psql(stack, "mlflow", versions)) == versions_before + 1
    # The MLflow server's answers after the restart: it served the sweep again, and what it
    # refused while PostgreSQL was away is what the trials take for a hiccup and retry
    # (flows.tracking.server_hiccup): 401 from the auth database, 503 from the tracking store
    # (a temporary outage), and 500 only for a request whose database connection the restart
    # cut (MLflow answers 500 when psycopg2 finds the connection closed mid-transaction);
    # never another server error.
    assert answers["200"] > 0, answers
    assert {code for code in answers if code.startswith("5")} <= {"500", "503"}, answers
    cut = sum("OperationalError) server closed the connection unexpectedly" in x for x in after)
    assert answers["500"] <= cut, (answers, "\n".join(after[-200:]))
    print(f"\nMLflow answers after the restart: {dict(answers)} (refused: 401 {answers['401']}, "
          f"503 {answers['503']})")  # fmt: skip
