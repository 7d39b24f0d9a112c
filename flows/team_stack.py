"""A team's servers on one machine, bound to 127.0.0.1: PostgreSQL, an MLflow tracking server
on it (proxied artifacts, basic-auth app), a Prefect server on it with the process work pool
`team-process`, and a folder standing in for the object store of a shared DVC remote.

    python -m flows.team_stack up   --root .team-stack   # prints the addresses and accounts
    python -m flows.team_stack down --root .team-stack
    python -m flows.team_stack restart-postgres --root .team-stack   # a database failover

`up` makes the accounts people and workers use: `pipeline` (the service account that trains,
registers and moves aliases) and `reader` (sees runs and versions, cannot move `@champion` or
delete a version); their generated passwords are in `<root>/credentials.env` (mode 0600). A
process gets them only through the environment (MLFLOW_TRACKING_USERNAME/PASSWORD), never from
params.yaml, a tracking URI or a tag. Everything the stack writes lives under `--root`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from glob import glob
from pathlib import Path

from vae_core.errors import VaeError

HOST = "127.0.0.1"
STATE_NAME = "stack.json"
CREDENTIALS_NAME = "credentials.env"
ACCOUNTS = ("pipeline", "reader")
DATABASES = ("mlflow", "mlflow_auth", "prefect")
#: The process work pool the `team-nightly` deployment (prefect.yaml) goes to.
WORK_POOL = "team-process"


class StackError(VaeError, RuntimeError):
    """A server of the team stack did not start (its log is named in the message)."""


@dataclass
class Stack:
    root: str
    pg_dir: str
    pg_port: int
    mlflow_url: str
    prefect_api: str
    pids: dict[str, int]
    #: The folder standing in for the team's object store, as the DVC remote `shared`.
    dvc_remote: str = ""

    @property
    def credentials(self) -> dict[str, str]:
        return read_credentials(Path(self.root))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else Debian's versioned folder."""
    found = shutil.which(name) or next(iter(sorted(glob(f"/usr/lib/postgresql/*/bin/{name}"))), "")
    if not found:
        raise StackError(
            f"{name}: PostgreSQL is not installed (expected it on PATH or in "
            "/usr/lib/postgresql/*/bin; on Debian: apt-get install postgresql)"
        )
    return found


def _as_postgres(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root; as root, run it as the `postgres` system user."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise StackError(f"{what} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def _wait_http(
    url: str, what: str, log: Path, proc: subprocess.Popen, timeout_s: float = 180.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited before answering {url}; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise StackError(f"{what} did not answer {url} within {timeout_s:.0f} s; see {log}")


def _start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A server in its own session (so `down` can stop it and its workers), logging to a file."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )


def read_credentials(root: Path) -> dict[str, str]:
    """KEY=value lines of <root>/credentials.env."""
    lines = (Path(root) / CREDENTIALS_NAME).read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line and not line.startswith("#"))


def _write_credentials(root: Path, values: dict[str, str]) -> None:
    path = root / CREDENTIALS_NAME
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("# team stack secrets: keep out of git, params.yaml and tracking URIs\n")
        out.writelines(f"{k}={v}\n" for k, v in values.items())


def _pg_dir(root: Path) -> Path:
    """Where the cluster lives: root/pg, or, when PostgreSQL must run as the `postgres` user
    (we are root), a folder of its own under the system's temp dir, since `root` may sit
    below folders that user cannot enter."""
    if os.geteuid() != 0:
        return root / "pg"
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="team-stack-pg-"))
    shutil.chown(folder, "postgres", "postgres")
    return folder


def _postgres(root: Path, pg: Path, secrets_: dict[str, str]) -> tuple[int, int]:
    """A fresh cluster in `pg` with one database and owner per service."""
    data, sock = pg / "data", pg / "socket"
    data.mkdir(parents=True)
    sock.mkdir(parents=True)
    if os.geteuid() == 0:
        for path in (data, sock):
            shutil.chown(path, "postgres", "postgres")
    pwfile = pg / "superuser.pw"
    pwfile.write_text(secrets_["PG_SUPERUSER_PASSWORD"] + "\n")
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    os.chmod(pwfile, 0o600)
    initdb = [_pg_bin("initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={pwfile}"]
    _run(_as_postgres([*initdb, "--auth=scram-sha-256", "-E", "UTF8"]), "initdb")
    port = _free_port()
    log = pg / "postgres.log"
    log.touch()
    if os.geteuid() == 0:
        shutil.chown(log, "postgres", "postgres")
    (root / "logs" / "postgres.log").unlink(missing_ok=True)
    (root / "logs" / "postgres.log").symlink_to(log)
    pid = _pg_ctl(pg, port, "start")
    env = dict(os.environ, PGPASSWORD=secrets_["PG_SUPERUSER_PASSWORD"])
    for db in DATABASES:
        password = secrets_[f"PG_{db.upper()}_PASSWORD"]
        sql = f"CREATE ROLE {db} LOGIN PASSWORD '{password}'; CREATE DATABASE {db} OWNER {db};"
        for statement in sql.split("; "):
            done = subprocess.run(
                [_pg_bin("psql"), "-h", HOST, "-p", str(port), "-U", "postgres", "-v",
                 "ON_ERROR_STOP=1", "-c", statement.rstrip(";")],
                capture_output=True, text=True, env=env,
            )  # fmt: skip
            if done.returncode != 0:
                raise StackError(f"psql: {statement.split(' PASSWORD')[0]}: {done.stderr.strip()}")
    return port, pid


def _pg_ctl(pg: Path, port: int, action: str) -> int:
    """`pg_ctl start|stop` on the stack's cluster (stop: fast, dropping connections); returns
    the postmaster's pid after a start. The server logs to pg/postgres.log, never to our pipes
    (a server holding them open would keep `subprocess.run` waiting)."""
    data = pg / "data"
    options = f"-c listen_addresses={HOST} -c port={port} -k {pg / 'socket'}"
    cmd = [_pg_bin("pg_ctl"), "-D", str(data), "-l", str(pg / "postgres.log"), "-o", options, "-w"]
    mode = ["-m", "fast"] if action == "stop" else []
    _run(_as_postgres([*cmd, *mode, action]), f"pg_ctl {action}")
    return int((data / "postmaster.pid").read_text().split()[0]) if action == "start" else 0


def restart_postgres(root: Path) -> None:
    """Stop PostgreSQL (fast: open connections are dropped) and start it again: what a database
    upgrade or a failover does to the servers on it."""
    stack = load(root)
    _pg_ctl(Path(stack.pg_dir), stack.pg_port, "stop")
    stack.pids["postgres"] = _pg_ctl(Path(stack.pg_dir), stack.pg_port, "start")
    (Path(stack.root) / STATE_NAME).write_text(json.dumps(asdict(stack), indent=2) + "\n")


def _pg_url(driver: str, db: str, port: int, password: str) -> str:
    return f"{driver}://{db}:{password}@{HOST}:{port}/{db}"


def up(root: Path) -> Stack:
    """Start PostgreSQL, MLflow and Prefect under `root` (which must not hold a stack yet)."""
    root = Path(root).resolve()
    if (root / STATE_NAME).exists():
        raise StackError(f"{root / STATE_NAME}: a stack is already up here (run `down` first)")
    (root / "logs").mkdir(parents=True, exist_ok=True)
    secrets_ = {"PG_SUPERUSER_PASSWORD": secrets.token_urlsafe(18)}
    secrets_ |= {f"PG_{db.upper()}_PASSWORD": secrets.token_urlsafe(18) for db in DATABASES}
    secrets_["MLFLOW_ADMIN_PASSWORD"] = secrets.token_urlsafe(18)
    secrets_ |= {f"MLFLOW_{a.upper()}_PASSWORD": secrets.token_urlsafe(18) for a in ACCOUNTS}
    _write_credentials(root, secrets_)
    pids: dict[str, int] = {}
    pg = _pg_dir(root)
    pg_port, pids["postgres"] = _postgres(root, pg, secrets_)
    stack = Stack(str(root), str(pg), pg_port, "", "", pids)  # `down` can stop what runs
    (root / STATE_NAME).write_text(json.dumps(asdict(stack), indent=2) + "\n")
    try:
        return _servers(root, stack, secrets_)
    except BaseException:
        down(root)  # nothing left running behind a failed start
        raise


def _servers(root: Path, stack: Stack, secrets_: dict[str, str]) -> Stack:
    """MLflow and Prefect on the stack's PostgreSQL; the MLflow accounts."""
    pg_port, pids = stack.pg_port, stack.pids

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    auth_ini = root / "mlflow_auth.ini"
    auth_db = _pg_url(
        "postgresql+psycopg2", "mlflow_auth", pg_port, secrets_["PG_MLFLOW_AUTH_PASSWORD"]
    )
    auth_ini.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = {auth_db}\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        # Each request's password check is a scrypt hash (~80 ms of CPU, 350 ms a request
        # measured on two cores); a run makes hundreds. Cached for a minute in the one server
        # worker, which also sees every password change made through the API.
        "auth_cache_ttl_seconds = 60\n"
    )
    os.chmod(auth_ini, 0o600)
    mlflow_port = _free_port()
    mlflow_env = env | {
        "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
        "MLFLOW_AUTH_ADMIN_PASSWORD": secrets_["MLFLOW_ADMIN_PASSWORD"],
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    store = _pg_url("postgresql+psycopg2", "mlflow", pg_port, secrets_["PG_MLFLOW_PASSWORD"])
    mlflow_log = root / "logs" / "mlflow.log"
    mlflow_proc = _start(
        [str(bin_dir / "mlflow"), "server", "--host", HOST, "--port", str(mlflow_port),
         "--backend-store-uri", store, "--serve-artifacts",
         "--artifacts-destination", str(root / "artifacts"), "--app-name", "basic-auth",
         "--workers", "1"],
        mlflow_log, mlflow_env, root,
    )  # fmt: skip
    mlflow_url = f"http://{HOST}:{mlflow_port}"

    prefect_port = _free_port()
    prefect_db = _pg_url("postgresql+asyncpg", "prefect", pg_port, secrets_["PG_PREFECT_PASSWORD"])
    prefect_env = env | {
        "PREFECT_HOME": str(root / "prefect-home"),
        # The UI's pages call this address (else http://127.0.0.1:4200/api, not this server).
        "PREFECT_SERVER_UI_API_URL": f"http://{HOST}:{prefect_port}/api",
        "PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    }
    prefect_log = root / "logs" / "prefect.log"
    prefect_proc = _start(
        [str(bin_dir / "prefect"), "server", "start", "--host", HOST, "--port", str(prefect_port)],
        prefect_log, prefect_env, root,
    )  # fmt: skip
    pids |= {"mlflow": mlflow_proc.pid, "prefect": prefect_proc.pid}
    stack.mlflow_url, stack.prefect_api = mlflow_url, f"http://{HOST}:{prefect_port}/api"
    (root / STATE_NAME).write_text(json.dumps(asdict(stack), indent=2) + "\n")
    _wait_http(f"{mlflow_url}/health", "the MLflow server", mlflow_log, mlflow_proc)
    prefect_health = f"{stack.prefect_api}/health"
    _wait_http(prefect_health, "the Prefect server", prefect_log, prefect_proc)
    for account in ACCOUNTS:
        _create_mlflow_user(mlflow_url, secrets_, account)
    _run(
        [str(bin_dir / "prefect"), "work-pool", "create", WORK_POOL, "--type", "process"],
        f"creating the Prefect work pool {WORK_POOL}",
        env=prefect_env | {"PREFECT_API_URL": stack.prefect_api},
    )
    stack.dvc_remote = str(root / "dvc-remote")
    Path(stack.dvc_remote).mkdir(exist_ok=True)
    (root / STATE_NAME).write_text(json.dumps(asdict(stack), indent=2) + "\n")
    return stack


def _create_mlflow_user(url: str, secrets_: dict[str, str], account: str) -> None:
    """An MLflow user (by the admin); every user reads everything (default_permission READ),
    and what a user creates (experiments, registered models) it manages."""
    import base64

    body = json.dumps(
        {"username": account, "password": secrets_[f"MLFLOW_{account.upper()}_PASSWORD"]}
    )
    token = base64.b64encode(f"admin:{secrets_['MLFLOW_ADMIN_PASSWORD']}".encode()).decode()
    request = urllib.request.Request(
        f"{url}/api/2.0/mlflow/users/create",
        data=body.encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Basic {token}"},
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


def account_env(stack: Stack, account: str) -> dict[str, str]:
    """The environment a process of `account` needs: the servers' addresses and its password."""
    password = stack.credentials[f"MLFLOW_{account.upper()}_PASSWORD"]
    return {
        "MLFLOW_TRACKING_URI": stack.mlflow_url,
        "MLFLOW_TRACKING_USERNAME": account,
        "MLFLOW_TRACKING_PASSWORD": password,
        "PREFECT_API_URL": stack.prefect_api,
    }


def load(root: Path) -> Stack:
    return Stack(**json.loads((Path(root).resolve() / STATE_NAME).read_text()))


def down(root: Path) -> None:
    """Stop the servers of the stack under `root` (its data stays for the next `up` to refuse
    or for a person to inspect; delete the folder to start afresh)."""
    root = Path(root).resolve()
    stack = load(root)
    for name in ("prefect", "mlflow"):
        if name not in stack.pids:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(stack.pids[name], signal.SIGTERM)
    with contextlib.suppress(StackError):  # already stopped
        _pg_ctl(Path(stack.pg_dir), stack.pg_port, "stop")
    (root / STATE_NAME).unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.team_stack", description=__doc__)
    parser.add_argument("action", choices=("up", "down", "restart-postgres"))
    parser.add_argument("--root", type=Path, default=Path(".team-stack"))
    args = parser.parse_args(argv)
    try:
        if args.action == "down":
            down(args.root)
            print(f"stopped the stack under {args.root}")
            return 0
        if args.action == "restart-postgres":
            restart_postgres(args.root)
            print(f"restarted PostgreSQL of the stack under {args.root}")
            return 0
        stack = up(args.root)
    except VaeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"MLflow   {stack.mlflow_url}  (basic auth; accounts: {', '.join(ACCOUNTS)}, admin)")
    print(f"Prefect  {stack.prefect_api}")
    print(f"Postgres {HOST}:{stack.pg_port}")
    print(f"passwords: {Path(stack.root) / CREDENTIALS_NAME} (mode 0600)")
    print(f"DVC      {stack.dvc_remote}  (the remote `shared`)")
    print(f"work pool {WORK_POOL} (process)")
    print("a worker, in its own clone of the project:")
    print(f"  export MLFLOW_TRACKING_URI={stack.mlflow_url} PREFECT_API_URL={stack.prefect_api}")
    print("  export MLFLOW_TRACKING_USERNAME=pipeline MLFLOW_TRACKING_PASSWORD=<from the file>")
    print(f"  dvc remote add --local shared {stack.dvc_remote}")
    print(f"  VAE_WORKSPACE=$PWD prefect worker start --pool {WORK_POOL} --limit 1")
    print("the deployment, once, from any clone: prefect deploy --name team-nightly")
    return 0


if __name__ == "__main__":
    sys.exit(main())
