"""Session-wide fixtures: the shared Prefect API, throw-away pipeline workspaces (a git + DVC
copy of this project), and real server subprocesses that are always stopped.

No mocks: flows run against a real Prefect server (the test harness, or `prefect server start`),
MLflow writes to a real SQLite store or a real `mlflow server`, and DVC runs as the real CLI.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
from prefect_harness import harness_session, quiet_environment

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN_DIR = Path(sys.executable).parent

quiet_environment()

#: What a pipeline workspace needs from this repo: what a fresh clone has, minus the tests.
WORKSPACE_FILES = (
    ".dvcignore",
    ".gitignore",
    ".dvc/config",
    ".dvc/.gitignore",
    "dvc.yaml",
    "dvc.lock",
    "params.yaml",
    "prefect.yaml",
    "pyproject.toml",
)
WORKSPACE_PACKAGES = ("flows", "vae_core")

#: The smallest pipeline that still exercises every step: the run takes about a minute here.
TINY_OVERRIDES = (
    "train.epochs=1",
    "evaluate.iwae_k=5",
    "evaluate.iwae_test_size=200",
    "evaluate.num_samples=100",
    "classifier.epochs=1",
    "promote.bootstrap_samples=200",
    "promote.floor_nll=1000",  # a one- or two-epoch model (~210 nats) meets it
)


# --------------------------------------------------------------------------- Prefect


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A temporary Prefect server for the whole session (started on first use); yields its
    API URL. In-process flow runs, `get_client()` and artifacts all go to it."""
    yield from harness_session()


# --------------------------------------------------------------------------- workspaces


def git(root: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-c", "user.name=pytest", "-c", "user.email=pytest@localhost", *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def make_workspace(root: Path) -> Path:
    """Copy the project (code, dvc.yaml, dvc.lock, params.yaml, DVC config) into ``root`` and
    commit it to a new git repository, as a fresh clone would look. No data, no MLflow store."""
    root.mkdir(parents=True, exist_ok=True)
    for rel in WORKSPACE_FILES:
        src = REPO_ROOT / rel
        if src.is_file():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / rel)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in WORKSPACE_PACKAGES:
        shutil.copytree(REPO_ROOT / pkg, root / pkg, ignore=ignore, dirs_exist_ok=True)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "workspace for a pipeline test")
    return root


@pytest.fixture(scope="session")
def workspace_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``factory(name)``: a new git-committed copy of the project in a temporary folder."""
    return lambda name: make_workspace(tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return list(TINY_OVERRIDES)


# --------------------------------------------------------------------------- MLflow


@pytest.fixture(scope="module")
def isolated_mlflow_uri() -> Iterator[None]:
    """Give back MLflow's process-global tracking URI (and MLFLOW_TRACKING_URI, which
    `mlflow.set_tracking_uri` exports) as they were before the module: the pipeline points
    them at its workspace, and the next module must not inherit that."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved_global = tracking_utils._tracking_uri
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    mlflow.set_tracking_uri(None)
    yield
    mlflow.set_tracking_uri(saved_global)
    if saved_env is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = saved_env


# --------------------------------------------------------------------------- subprocesses


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bin_path(name: str) -> str:
    """A console script of this virtualenv (mlflow, prefect, vae-pipeline, dvc)."""
    exe = BIN_DIR / name
    return str(exe) if exe.exists() else name


def subprocess_env(**extra: str) -> dict[str, str]:
    """This environment for a child process, with this virtualenv first on PATH and no
    tracking or Prefect server leaking in from the test process."""
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "PYTHONPATH"):
        env.pop(key, None)
    env["PATH"] = str(BIN_DIR) + os.pathsep + env.get("PATH", "")
    env.update(extra)
    return env


@dataclass
class Proc:
    """A child process in its own process group, its output in a log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    _log_file: object = field(repr=False, default=None)

    def tail(self, lines: int = 60) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
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


def wait_for_http(url: str, proc: Proc, timeout_s: float, expect: str | None = None) -> None:
    """Poll ``url`` until it answers 200 (with ``expect`` in the body, if given)."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            pytest.fail(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                body = resp.read().decode(errors="replace")
                if resp.status == 200 and (expect is None or expect in body):
                    return
                last = f"{resp.status} {body[:200]}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.5)
    pytest.fail(f"{proc.name}: {url} did not answer in {timeout_s} s ({last}):\n{proc.tail()}")


@pytest.fixture(scope="module")
def start_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Proc]]:
    """``start(name, cmd, env=..., cwd=...)``: a subprocess in its own process group, logging
    to a file; every process started this way is stopped when the module ends, whatever
    happened (tests may stop one earlier with ``proc.stop()``)."""
    started: list[Proc] = []
    logs = tmp_path_factory.mktemp("process-logs")

    def start(
        name: str, cmd: Sequence[str], *, env: dict[str, str], cwd: Path | None = None
    ) -> Proc:
        log = logs / f"{name}.log"
        log_file = log.open("wb")
        popen = subprocess.Popen(
            list(cmd),
            cwd=cwd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        proc = Proc(name, popen, log, log_file)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture(scope="session")
def proc_tools() -> SimpleNamespace:
    """The subprocess helpers above, for test modules (which cannot import a conftest)."""
    return SimpleNamespace(
        free_port=free_port,
        bin_path=bin_path,
        env=subprocess_env,
        wait_for_http=wait_for_http,
    )
