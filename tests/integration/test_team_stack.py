"""The team stack for real (`python -m flows.team_stack up|down`): PostgreSQL; an MLflow server on
it with proxied artifacts and basic auth; a Prefect server on it with the process pool
`team-process`; a folder as the team's DVC remote `shared`.

Two clones of the project, each a Prefect process worker with its own workspace, run the one
deployment `team-nightly` (prefect.yaml); they share nothing but the servers and the DVC remote.
Then the faults, each at a point the system reports, never on a timer: a worker killed while
its run trains, and PostgreSQL restarted while a Dask sweep runs.

The stack starts once for the module (about 20 s) and the scenario below runs once, in order
(each step depends on the registry the previous one left); the tests assert on what it
recorded and on the servers' state. Run alone with `pytest -m team_stack`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from integration_servers import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.team_stack]

MODEL = "mnist-vae"
DEPLOYMENT = "training-pipeline/team-nightly"
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
RUN_TIMEOUT_S = 900  # one tiny run is ~1-2 min on two busy cores
#: Two trials: one of one epoch, finished long before the other (forty) is: the restart of
#: PostgreSQL lands between them.
SWEEP = """sweep:
  name: team
  method: grid
  metric: val_neg_elbo
  parameters:
    train.epochs: [1, 40]
"""


# --------------------------------------------------------------------------- talking to it


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
    request = urllib.request.Request(
        f"{stack.prefect_api}{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def _flow_run(stack, flow_run_id: str) -> dict:
    return _prefect(stack, "GET", f"/flow_runs/{flow_run_id}")


def _flow_logs(stack, flow_run_id: str) -> list[str]:
    """What the Prefect UI shows on the flow run's page."""
    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200, "sort": "TIMESTAMP_ASC"}
    return [entry["message"] for entry in _prefect(stack, "POST", "/logs/filter", body)]


def _logs_with(stack, flow_run_id: str, *prefixes: str) -> list[str]:
    """The flow run's logs once a line starting with each prefix is there: a run's last lines
    reach the server shortly after its final state does, so this waits for them."""

    def ready():
        logs = _flow_logs(stack, flow_run_id)
        return all(any(line.startswith(p) for line in logs) for p in prefixes) and logs

    return wait_for(f"log lines {prefixes} of flow run {flow_run_id}", ready, timeout_s=120)


def _as(stack, account: str, code: str, proc_tools) -> subprocess.CompletedProcess:
    """Python code run in a process that has only `account`'s environment."""
    from flows.team_stack import account_env

    env = proc_tools.env(**account_env(stack, account))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def _read(stack, code: str, proc_tools, account: str = "reader"):
    """JSON printed by MLflow client code run as `account` (default: the reader)."""
    done = _as(
        stack,
        account,
        f"import json; from mlflow import MlflowClient; c = MlflowClient()\n{code}",
        proc_tools,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


RUNS_OF_FLOW_RUN = (
    "runs = c.search_runs([c.get_experiment_by_name('vae-mnist').experiment_id], "
    "filter_string=\"tags.`prefect.flow_run_id` = '{id}'\")\n"
    "print(json.dumps([dict(run_id=r.info.run_id, status=r.info.status, tags=r.data.tags, "
    "versions=[v.version for v in c.search_model_versions(f\"run_id = '{{r.info.run_id}}'\")]) "
    "for r in runs]))"
)


def _mlflow_runs(stack, flow_run_id: str, proc_tools) -> list[dict]:
    """The MLflow runs a flow run made (lineage tag `prefect.flow_run_id`), as the reader."""
    return _read(stack, RUNS_OF_FLOW_RUN.format(id=flow_run_id), proc_tools)


def _champion(stack, proc_tools) -> str:
    return _read(
        stack,
        f"print(json.dumps(c.get_model_version_by_alias({MODEL!r}, 'champion').version))",
        proc_tools,
    )


def _snapshot(ws: Path) -> dict[str, bytes]:
    return {name: (ws / name).read_bytes() for name in ("params.yaml", "dvc.lock")}


def _kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and everything under it at once (a machine losing power): the worker
    and the flow run it started (in a session of its own, so not in the worker's group)."""
    parent = psutil.Process(pid)
    procs = [parent, *parent.children(recursive=True)]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


# --------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from flows import team_stack

    root = tmp_path_factory.mktemp("team-stack")
    started = team_stack.up(root)
    yield started
    team_stack.down(root)
    shutil.rmtree(started.pg_dir, ignore_errors=True)  # `down` keeps the data; a test does not


@pytest.fixture(scope="module")
def team(stack, workspace_factory, proc_tools, tmp_path_factory, start_process) -> SimpleNamespace:
    """Two clones with the remote `shared` configured, the deployment `team-nightly` deployed
    from the first, and a way to start a worker in either."""
    from flows.team_stack import WORK_POOL, account_env

    ws_a, ws_b = workspace_factory("clone-a"), workspace_factory("clone-b")
    cli_env = proc_tools.env(
        PREFECT_API_URL=stack.prefect_api, PREFECT_HOME=str(tmp_path_factory.mktemp("cli-home"))
    )
    dvc, prefect = proc_tools.bin_path("dvc"), proc_tools.bin_path("prefect")
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
        env = proc_tools.env(
            **account_env(stack, "pipeline"),
            VAE_WORKSPACE=str(ws),
            PREFECT_HOME=str(tmp_path_factory.mktemp(f"{name}-home")),
            PREFECT_WORKER_QUERY_SECONDS="2",
        )
        cmd = [prefect, "worker", "start", "--pool", WORK_POOL, "--name", name, "--limit", "1"]
        return start_process(name, cmd, env=env, cwd=ws)

    def submit(parameters: dict) -> str:
        path = f"/deployments/{deployment['id']}/create_flow_run"
        return _prefect(stack, "POST", path, {"parameters": parameters})["id"]

    def finish(flow_run_id: str, worker) -> dict:
        return wait_for(
            f"flow run {flow_run_id} to end",
            lambda: (r := _flow_run(stack, flow_run_id))["state_type"] in FINAL and r,
            RUN_TIMEOUT_S,
            proc=worker,
        )

    return SimpleNamespace(
        ws_a=ws_a, ws_b=ws_b, deployment=deployment, start_worker=start_worker, submit=submit,
        finish=finish,
    )  # fmt: skip


@pytest.fixture(scope="module")
def scenario(stack, team, tiny_overrides, proc_tools, start_process) -> SimpleNamespace:
    """Everything, in order; returns what each step left."""
    # The classifier keeps its committed settings, so that the stage outputs worker A pushes
    # are the ones the committed dvc.lock names (DVC's run cache skips stages with persistent
    # outputs, so a stage run with other parameters is run again in every clone).
    tiny_overrides = [o for o in tiny_overrides if not o.startswith("classifier.")]
    seen = SimpleNamespace()
    # 1. Worker A (only A is up) takes the first run: it prepares the data and pushes them.
    worker_a = team.start_worker("worker-a", team.ws_a)
    seen.fr_a = team.finish(team.submit({"overrides": tiny_overrides}), worker_a)
    worker_a.stop()
    # What `git pull` brings clone B: the dvc.lock A's run wrote, which a team commits. It names
    # the exact outputs A pushed (the classifier's bytes are not the same on every run, so the
    # lock committed in the repository may name outputs no one pushed).
    shutil.copy2(team.ws_a / "dvc.lock", team.ws_b / "dvc.lock")
    git = ["git", "-c", "user.name=worker-a", "-c", "user.email=a@localhost"]
    subprocess.run(
        [*git, "commit", "-q", "--allow-empty", "-am", "dvc.lock from worker A"],
        cwd=team.ws_b,
        check=True,
    )
    # 2. Worker B, another clone, takes the second: it pulls the data, trains two epochs, and
    #    its version is gated against A's champion.
    worker_b = team.start_worker("worker-b", team.ws_b)
    overrides_b = [*tiny_overrides, "train.epochs=2"]
    seen.fr_b = team.finish(team.submit({"overrides": overrides_b}), worker_b)
    seen.runs_a = _mlflow_runs(stack, seen.fr_a["id"], proc_tools)
    seen.runs_b = _mlflow_runs(stack, seen.fr_b["id"], proc_tools)
    seen.champion_after_b = _champion(stack, proc_tools)

    # 3. Worker B dies (with its flow run) once the run reports its first epoch to MLflow.
    seen.before_kill = _snapshot(team.ws_b)
    killed = team.submit({"overrides": [*tiny_overrides, "train.epochs=200"]})
    epochs_logged = (
        "select count(*) from metrics m join tags t on t.run_uuid = m.run_uuid where "
        f"t.key = 'prefect.flow_run_id' and t.value = '{killed}' and m.key = 'val/neg_elbo'"
    )
    wait_for(
        "the doomed run's first epoch",
        lambda: int(_psql(stack, "mlflow", epochs_logged)),
        RUN_TIMEOUT_S,
        proc=worker_b,
        every_s=0.5,
    )
    seen.killed_pids = _kill_tree(worker_b.popen.pid)
    seen.killed = killed
    seen.killed_state_after_kill = _flow_run(stack, killed)["state_type"]
    seen.left_after_kill = _snapshot(team.ws_b)
    seen.journal_after_kill = (team.ws_b / ".vae-pipeline.journal.json").is_file()
    seen.killed_runs_after_kill = _mlflow_runs(stack, killed, proc_tools)

    # 4. The worker comes back; the next run (the deployment's own parameters, as at 02:00)
    #    recovers the workspace, finds params.yaml as B's finished run left it, and so finds
    #    the data, the parameters and the code of version 2: nothing to train.
    worker_b2 = team.start_worker("worker-b-again", team.ws_b)
    seen.fr_next = team.finish(team.submit({}), worker_b2)
    worker_b2.stop()
    seen.killed_state = _flow_run(stack, killed)["state"]
    seen.killed_runs = _mlflow_runs(stack, killed, proc_tools)
    seen.after_next = _snapshot(team.ws_b)
    seen.journal_after_next = (team.ws_b / ".vae-pipeline.journal.json").is_file()

    # 5. A copy of version 1 by the service account, something a person might promote by hand.
    seen.copy_version = _read(
        stack,
        f"v = c.get_model_version({MODEL!r}, '1')\n"
        f"v2 = c.create_model_version({MODEL!r}, v.source, run_id=v.run_id, "
        "model_id=v.source.removeprefix('models:/'))\nprint(json.dumps(v2.version))",
        proc_tools,
        account="pipeline",
    )
    seen.versions_before_sweep = int(_psql(stack, "mlflow", "select count(*) from model_versions"))
    seen.champion_before_sweep = _champion(stack, proc_tools)
    seen.sweep = _sweep_through_a_database_restart(
        stack, team, tiny_overrides, proc_tools, start_process
    )
    return seen


def _sweep_through_a_database_restart(stack, team, tiny_overrides, proc_tools, start_process):
    """A Dask sweep in clone A; PostgreSQL restarted when its first trial is complete; the
    command run again if the first did not finish every trial."""
    from flows import team_stack

    (team.ws_a / "team-sweep.yaml").write_text(SWEEP)
    env = proc_tools.env(**team_stack.account_env(stack, "pipeline"))
    cmd = [proc_tools.bin_path("vae-pipeline"), "sweep", "--sweep-file", "team-sweep.yaml"]
    cmd += ["--dask-workers", "2", "--dvc-remote", "shared"]
    for override in tiny_overrides:
        cmd += ["-S", override]
    complete = (
        "select r.run_uuid, r.end_time from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'sweep.complete' and t.value = 'true' order by r.end_time"
    )
    # The point: Prefect has the first trial's task Completed, so all its MLflow writes are done.
    trial_done = (
        "select count(*) from task_run where name = 'trial-t00' and state_type = 'COMPLETED'"
    )
    sweep = start_process("sweep", cmd, env=env, cwd=team.ws_a)
    wait_for(
        "the sweep's first trial to complete",
        lambda: int(_psql(stack, "prefect", trial_done)),
        RUN_TIMEOUT_S,
        proc=sweep,
        every_s=0.5,
    )
    seen = SimpleNamespace(first=_psql(stack, "mlflow", complete).splitlines()[0].split("|"))
    mlflow_log = Path(stack.root) / "logs" / "mlflow.log"
    log_before = len(mlflow_log.read_text(errors="replace").splitlines())
    team_stack.restart_postgres(Path(stack.root))
    seen.returncode = sweep.popen.wait(RUN_TIMEOUT_S)
    seen.log = sweep.tail(400)
    after = mlflow_log.read_text(errors="replace").splitlines()[log_before:]
    seen.refused = {
        code: sum(f'HTTP/1.1" {code} ' in line for line in after) for code in (401, 503)
    }
    seen.reruns = []
    if seen.returncode != 0 or _psql(stack, "mlflow", complete).count("\n") < 1:
        again = subprocess.run(
            cmd, cwd=team.ws_a, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S
        )
        seen.reruns.append(again)
    seen.complete = [line.split("|") for line in _psql(stack, "mlflow", complete).splitlines()]
    seen.children = _psql(
        stack, "mlflow",
        "select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
        "where t.key = 'sweep.role' and t.value = 'trial'",
    )  # fmt: skip
    seen.parents = _psql(
        stack, "mlflow",
        "select count(*) from tags where key = 'sweep.role' and value = 'parent'",
    )  # fmt: skip
    return seen


# --------------------------------------------------------------------------- two workers


def test_servers_keep_their_state_in_postgresql(stack, scenario) -> None:
    run_id = scenario.runs_a[0]["run_id"]
    status = _psql(stack, "mlflow", f"select status from runs where run_uuid = '{run_id}'")
    assert status == "FINISHED"
    users = _psql(stack, "mlflow_auth", "select username from users order by username")
    assert users.split() == ["admin", "pipeline", "reader"]
    completed = "select count(*) from flow_run where state_type = 'COMPLETED'"
    assert int(_psql(stack, "prefect", completed)) >= 3  # A's, B's, the recovering one
    # The artifacts went through the server into its own store (the workers need no storage).
    assert any((Path(stack.root) / "artifacts").rglob("model.safetensors"))


def test_the_prefect_ui_calls_this_server(stack) -> None:
    """The UI's pages fetch from the API address it is given: this server's, not Prefect's
    default http://127.0.0.1:4200/api (seen: a blank page saying it cannot connect)."""
    base = stack.prefect_api.removesuffix("/api")
    with urllib.request.urlopen(f"{base}/ui-settings", timeout=30) as resp:
        assert json.loads(resp.read())["api_url"] == stack.prefect_api


def test_two_workers_run_one_deployment_each_in_its_own_clone(stack, team, scenario) -> None:
    """Both flow runs are of `team-nightly`; each MLflow run (one experiment) names the clone
    of the worker that ran it."""
    for flow_run, runs, ws in (
        (scenario.fr_a, scenario.runs_a, team.ws_a),
        (scenario.fr_b, scenario.runs_b, team.ws_b),
    ):
        assert flow_run["state_type"] == "COMPLETED"
        assert flow_run["deployment_id"] == team.deployment["id"]
        (run,) = runs
        assert run["status"] == "FINISHED"
        assert run["tags"]["prefect.deployment"] == "team-nightly"
        assert run["tags"]["workspace"].endswith(str(ws.resolve()))
        assert not (ws / "mlruns").exists() and not (ws / "mlflow.db").exists()


def test_data_reach_the_second_clone_through_the_dvc_remote(stack, scenario) -> None:
    """A's run made the data and pushed them; B's pulled them, and DVC re-ran no stage but the
    fingerprint of the source (which always runs)."""
    logs_a = _logs_with(stack, scenario.fr_a["id"], "dvc repro ran: ", "dvc push -r shared: ")
    logs_b = _logs_with(stack, scenario.fr_b["id"], "dvc repro ran: ", "dvc pull -r shared: ")
    assert "dvc repro ran: source, prepare, classifier" in logs_a
    assert any(line.startswith("dvc push -r shared: ") and "pushed" in line for line in logs_a)
    assert any(line.startswith("dvc pull -r shared: ") and "fetched" in line for line in logs_b)
    ran_b = [line for line in logs_b if line.startswith("dvc repro")]
    assert ran_b == ["dvc repro fetch ran: source", "dvc repro ran: source"], logs_b
    assert any(Path(stack.dvc_remote).rglob("*"))


def test_the_gate_promotes_the_second_worker_over_the_first(scenario) -> None:
    (run_a,), (run_b,) = scenario.runs_a, scenario.runs_b
    assert run_a["versions"] == ["1"] and run_a["tags"]["gate.decision"] == "promote"
    assert run_b["versions"] == ["2"] and run_b["tags"]["gate.decision"] == "promote"
    assert scenario.champion_after_b == "2"


# --------------------------------------------------------------------------- a worker killed


def test_a_killed_worker_leaves_its_run_open_and_its_workspace_changed(scenario) -> None:
    """What the kill itself leaves: nobody tells the servers, and the clone holds the dead
    run's params.yaml and its journal."""
    assert len(scenario.killed_pids) >= 2  # the worker and the flow run it started
    assert scenario.killed_state_after_kill == "RUNNING"
    (run,) = scenario.killed_runs_after_kill
    assert run["status"] == "RUNNING"
    assert scenario.left_after_kill["params.yaml"] != scenario.before_kill["params.yaml"]
    assert scenario.journal_after_kill


def test_the_next_run_crashes_the_dead_run_and_restores_the_workspace(stack, scenario) -> None:
    assert scenario.fr_next["state_type"] == "COMPLETED"
    logs = _logs_with(stack, scenario.fr_next["id"], "recovered the workspace", "up to date: ")
    assert any(line.startswith("recovered the workspace from a dead run: ") for line in logs)
    assert any(line.startswith(f"up to date: {MODEL} v2 was made from") for line in logs), logs
    # The dead flow run is Crashed, saying why and by whom; its MLflow run failed, nothing
    # registered from it.
    state = scenario.killed_state
    assert state["type"] == "CRASHED"
    assert "died holding the workspace" in state["message"]
    assert scenario.fr_next["name"] in state["message"]
    (run,) = scenario.killed_runs
    assert run["status"] == "FAILED" and run["versions"] == []
    assert run["tags"]["failure.reason"].startswith("WorkerDied: its process died holding")
    # params.yaml and dvc.lock are byte for byte as before the killed run; no journal left.
    assert scenario.after_next == scenario.before_kill
    assert not scenario.journal_after_next


# --------------------------------------------------------------------------- PostgreSQL restart


def test_a_sweep_survives_a_database_restart(stack, scenario) -> None:
    """PostgreSQL restarted once the first trial was complete: that trial is kept as it was (same
    run, same end time), the other finishes (in the same command, or the rerun resumes it),
    one parent run, one winner registered."""
    sweep = scenario.sweep
    pg_log = (Path(stack.pg_dir) / "postgres.log").read_text(errors="replace")
    assert pg_log.count("database system is ready to accept connections") == 2  # start, restart
    assert sweep.returncode == 0 or all(r.returncode == 0 for r in sweep.reruns), sweep.log
    first_id, first_end = sweep.first
    assert [first_id, first_end] in sweep.complete
    assert len(sweep.complete) == 2
    statuses = sorted(line.split("|")[1] for line in sweep.children.splitlines())
    assert statuses == ["FINISHED", "FINISHED"], sweep.children
    assert sweep.parents == "1"
    versions = int(_psql(stack, "mlflow", "select count(*) from model_versions"))
    assert versions == scenario.versions_before_sweep + 1


# --------------------------------------------------------------------------- accounts


def test_credentials_are_never_written_down(stack, team, scenario, proc_tools) -> None:
    """Not in params.yaml, not in the tracking URI, not in any tag or param of the run."""
    secret = stack.credentials["MLFLOW_PIPELINE_PASSWORD"]
    assert secret not in (team.ws_a / "params.yaml").read_text()
    run_id = scenario.runs_a[0]["run_id"]
    seen = _read(
        stack,
        f"r = c.get_run({run_id!r})\n"
        "print(json.dumps([c.tracking_uri, r.data.tags, r.data.params, "
        f"c.get_model_version({MODEL!r}, '1').tags]))",
        proc_tools,
    )
    assert secret not in json.dumps(seen) and "pipeline" not in seen[0]


def test_the_reader_sees_runs_and_versions(stack, scenario, proc_tools) -> None:
    run_id = scenario.runs_b[0]["run_id"]
    seen = _read(
        stack,
        f"print(json.dumps([c.get_run({run_id!r}).info.status, "
        f"c.get_model_version({MODEL!r}, '2').run_id]))",
        proc_tools,
    )
    assert seen == ["FINISHED", run_id]


def test_the_reader_cannot_move_the_champion_or_delete_a_version(
    stack, scenario, proc_tools
) -> None:
    """Refused by the server's permissions, each with one line naming the account and the
    permission it lacks; the alias and the versions are as they were."""
    before = _champion(stack, proc_tools)
    count = "select count(*) from model_versions"
    versions = _psql(stack, "mlflow", count)
    code = (
        "import sys\n"
        "from mlflow import MlflowClient\n"
        "from flows.tracking import permission_refusal\n"
        "c = MlflowClient()\n"
        f"for act in (lambda: c.set_registered_model_alias('mnist-vae', 'champion', "
        f"{scenario.copy_version!r}),\n"
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
    assert _champion(stack, proc_tools) == before
    assert _psql(stack, "mlflow", count) == versions


def test_a_refused_cli_action_is_one_line(stack, team, scenario, proc_tools) -> None:
    """`vae-pipeline promote` by the reader: exit 2, one `error:` line naming the account and
    the permission, no traceback; the champion stays."""
    from flows.team_stack import account_env

    before = _champion(stack, proc_tools)
    env = proc_tools.env(**account_env(stack, "reader"))
    cmd = [proc_tools.bin_path("vae-pipeline"), "promote", scenario.copy_version]
    cmd += ["--reason", "a reader tries"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=team.ws_a)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith("error: MLflow account 'reader' may not move an alias")
    assert "needs EDIT permission" in errors[0] and "Traceback" not in done.stderr
    assert _champion(stack, proc_tools) == before


def test_without_credentials_nothing_is_served(stack) -> None:
    import urllib.error

    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(
            f"{stack.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1"
        )
    assert refused.value.code == 401
