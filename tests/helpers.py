"""Everything more than one test module needs, written once (`from helpers import ...`):
synthetic IDX folders, digests, the child-process environment, the `dvc` CLI and in-process
stages, ports, child processes that are always stopped, waiting on a condition (never on a fixed
time), the Prefect REST API, the MLflow server command and the security checks' pickle payload."""

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

# The synthetic IDX folders: the experiments' dry runs write the same ones.
from experiments.tiny_mnist import write_idx_folder as write_idx_folder
from vae_core.config import VAEConfig  # standard library only: no torch here

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent

#: No network here: nothing may try to phone home.
QUIET_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
QUIET_ENV |= {"DVC_NO_ANALYTICS": "1", "MLFLOW_ENABLE_TELEMETRY": "false"}
QUIET_ENV |= {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}

#: The flow the deployments run, and how long one tiny scheduled run may take on a busy
#: two-core machine (server start included).
FLOW = "training-pipeline"
RUN_TIMEOUT_S = 360


def quiet_environment() -> None:
    """Set the no-telemetry variables, leaving any value the caller already chose."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path ({} when it does not exist):
    compares trees byte for byte."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def bin_path(name: str) -> str:
    """A console script of this virtualenv (mlflow, prefect, vae-pipeline, dvc)."""
    exe = BIN_DIR / name
    return str(exe) if exe.exists() else name


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this virtualenv first on PATH (a stage's `python`
    is this interpreter), no tracking or Prefect server leaking in from the test process, no
    telemetry; ``extra`` last."""
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "PYTHONPATH"):
        env.pop(key, None)
    env["PATH"] = str(BIN_DIR) + os.pathsep + env.get("PATH", "")
    env.update(QUIET_ENV)
    env.update(extra)
    return env


def run_dvc(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """The real ``dvc`` CLI in ``root``."""
    cmd = [bin_path("dvc"), *args]
    return subprocess.run(
        cmd, cwd=root, env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def git(root: Path, *args: str) -> str:
    cmd = ["git", "-c", "user.name=pytest", "-c", "user.email=pytest@localhost", *args]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=True).stdout.strip()


def run_stage(
    root: Path, stage: str, out: Path, *overrides: str, raw: Path | None = None
) -> tuple[int, str]:
    """``python -m flows.stages STAGE`` in-process against ``root/params.yaml``; returns (exit
    status, stderr). A crash (not a refusal) comes back as -1 with its traceback."""
    from flows import stages

    args = [stage, "--params", str(root / "params.yaml"), "--out", str(out)]
    if raw is not None:
        args += ["--raw", str(raw)]
    for o in overrides:
        args += ["-S", o]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = stages.main(args)
        except BaseException as exc:  # noqa: BLE001 - reported as the test sees it
            err.write("Traceback (uncaught)\n" + "".join(traceback.format_exception(exc)))
            rc = -1
    return rc, err.getvalue()


def free_port() -> int:
    """A port nothing listens on once this returns (the socket is closed again): free for a
    server to take, or closed for a client that must find nobody there."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    """A child process in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    _log_file: Any = field(repr=False, default=None)

    def tail(self, lines: int = 60) -> str:
        text = self.log.read_text(errors="replace") if self.log.is_file() else ""
        return "\n".join(text.splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM to the whole group (the process and its children), then SIGKILL."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(grace_s)
        # Children that outlived their parent (server workers, flow runs) are still in the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        if self.alive():
            self.popen.wait(10)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


def spawn(name: str, cmd: Sequence[str], log: Path, env: dict[str, str], cwd: Path | None) -> Proc:
    """Start ``cmd`` in its own process group, stdout and stderr into ``log``."""
    log_file = log.open("wb")
    popen = subprocess.Popen(
        list(cmd), cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return Proc(name, popen, log, log_file)


def kill_tree(pid: int) -> list[int]:
    """SIGKILL a process and everything under it at once (a machine losing power): a worker
    and the flow run it started (in a session of its own, so not in the worker's group)."""
    parent = psutil.Process(pid)
    procs = [parent, *parent.children(recursive=True)]
    for proc in procs:
        proc.kill()
    psutil.wait_procs(procs, timeout=30)
    return [p.pid for p in procs]


def wait_for(
    what: str, check: Callable[[], Any], timeout_s: float, proc: Proc | None = None, every_s=2.0
) -> Any:
    """Poll ``check`` until it returns something truthy (returned); fail with ``what`` after
    ``timeout_s``, or at once when ``proc`` dies, with its log."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if proc is not None and not proc.alive():
            pytest.fail(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        time.sleep(every_s)
    tail = f"\n{proc.name} log:\n{proc.tail()}" if proc is not None else ""
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}{tail}")


def wait_for_http(url: str, proc: Proc, timeout_s: float, expect: str | None = None) -> None:
    """Wait until ``url`` answers 200 (with ``expect`` in the body, if given)."""

    def answers() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode(errors="replace")
                return resp.status == 200 and (expect is None or expect in body)
        except (urllib.error.URLError, OSError):
            return False

    wait_for(f"{url} to answer", answers, timeout_s, proc, every_s=0.5)


def mlflow_server_cmd(root: Path, port: int) -> list[str]:
    """`mlflow server` on loopback, SQLite in ``root``, artifacts proxied, one worker."""
    return [
        bin_path("mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{root / 'm.db'}",
        "--artifacts-destination", str(root / "artifacts"), "--workers", "1",
    ]  # fmt: skip


#: The MLflow server's environment: no job runner (the pipeline needs none, and it would start
#: seven extra worker processes).
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_server(start_process, name: str, root: Path, port: int) -> Proc:
    """`mlflow_server_cmd(root, port)` started by the ``start_process`` fixture, once it answers."""
    cmd, env = mlflow_server_cmd(root, port), child_env(**MLFLOW_SERVER_ENV)
    proc = start_process(name, cmd, env=env, cwd=root)
    wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout_s=180)
    return proc


#: How often a call answered 503 is sent again before the test fails.
PREFECT_503_ATTEMPTS = 6


def prefect_api(server: SimpleNamespace, method: str, path: str, body: dict | None = None):
    """One call to the Prefect REST API of ``server`` (``server.api``); None on 404.

    The server answers 503 only when its database was busy (SQLite's SQLITE_BUSY, see
    `prefect.server.api.server.is_client_retryable_exception`) and the request's transaction
    was rolled back, so nothing was created: sending it again, POST included, is what
    Prefect's own client does, and what this does, with a growing pause."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    for attempt in range(PREFECT_503_ATTEMPTS):
        req = urllib.request.Request(f"{server.api}{path}", data, headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            if exc.code != 503 or attempt == PREFECT_503_ATTEMPTS - 1:
                raise
        time.sleep(0.5 * 2**attempt)


def automations_named(server: SimpleNamespace, name: str) -> list[dict]:
    """The automations of that name on ``server``."""
    return [a for a in prefect_api(server, "POST", "/automations/filter", {}) if a["name"] == name]


def prefect_client_env(server: SimpleNamespace, tmp: Path, **extra: str) -> dict[str, str]:
    """A Prefect client of ``server`` with its own PREFECT_HOME (no user profile)."""
    home = tmp / "prefect-client-home"
    home.mkdir(exist_ok=True)
    return child_env(PREFECT_API_URL=server.api, PREFECT_HOME=str(home), **extra)


def deployment_runs(server: SimpleNamespace, deployment: dict, serve: Proc) -> list[dict]:
    """Every flow run of ``deployment``; a failed or crashed one fails the test at once, with
    the serving process's log."""
    body = {"deployments": {"id": {"any_": [deployment["id"]]}}, "limit": 200}
    found = prefect_api(server, "POST", "/flow_runs/filter", body)
    bad = [r for r in found if r["state_type"] in ("FAILED", "CRASHED")]
    if bad:
        pytest.fail(f"a scheduled run ended {bad[0]['state_name']}:\n{serve.tail(150)}")
    return found


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def payload_module(marker: Path):
    """An nn.Module (so MLflow's pickle flavour accepts it) that pickles as a Payload."""
    import torch

    class PayloadModule(torch.nn.Module):
        def __reduce__(self):
            return Payload(marker).__reduce__()

    return PayloadModule()


#: Burda's two-stochastic-layer model, small: z1 of 6 units, the top layer z2 of 3.
TWO_LAYER = VAEConfig(
    architecture="mlp2", hidden_sizes=[32, 16], latent_dim=6, activation="tanh",
    top_hidden_sizes=[8], top_latent_dim=3,
)  # fmt: skip


def random_splits(sizes: dict[str, int]):
    """Splits of random grey-level blobs with balanced labels (``{"train": n, "val": n,
    "holdout": n, "test": n}``), for tests where only shapes and dtypes matter."""
    import torch

    from vae_core.data import DatasetSplits

    gen, parts = torch.Generator().manual_seed(0), {}
    for split, n in sizes.items():
        parts[f"{split}_images"] = (torch.rand(n, 28, 28, generator=gen) ** 3 * 255).byte()
        parts[f"{split}_labels"] = torch.arange(n, dtype=torch.int64) % 10
    for split in ("holdout", "test"):
        bits = torch.bernoulli(parts[f"{split}_images"].float() / 255, generator=gen)
        parts[f"{split}_binarized"] = bits.to(torch.uint8)
    return DatasetSplits(**parts)
