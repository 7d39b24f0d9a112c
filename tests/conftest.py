"""Session-wide fixtures: the shared Prefect API, pipeline workspaces (a git + DVC copy of this
project, prepared once and copied per test), and server subprocesses that are always stopped.
No mocks: real Prefect and MLflow servers or stores, the real `dvc` CLI. The plain helpers
these fixtures use live in tests/helpers.py, which test modules import."""

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from helpers import REPO_ROOT, Proc, git, quiet_environment, run_dvc, spawn

quiet_environment()

#: What a pipeline workspace needs from this repo: what a fresh clone has, minus the tests.
WORKSPACE_FILES = (".dvcignore", ".gitignore", ".dvc/config", ".dvc/.gitignore", "dvc.yaml")
WORKSPACE_FILES += ("dvc.lock", "params.yaml", "prefect.yaml", "pyproject.toml")
WORKSPACE_PACKAGES = ("experiments", "flows", "vae_core")

#: The parameters of the prepared workspace: the smallest model, data stages and evaluation
#: that still run every step of the pipeline. The data-stage keys are written before `dvc
#: repro`, so runs that override only train/model/evaluate/promote keys find the data stages
#: up to date.
TINY_PARAMS = (
    "classifier.epochs=1", "data.val_size=200", "train.device=cpu", "train.epochs=1",
    "train.batch_size=256", "train.patience=0", "model.hidden_sizes=[32]", "model.latent_dim=2",
    "evaluate.iwae_k=2", "evaluate.iwae_test_size=50", "evaluate.num_samples=50",
    "promote.bootstrap_samples=20",
    "promote.floor_nll=1000",  # a one- or two-epoch model (~210 nats) meets it
)  # fmt: skip


@pytest.fixture(scope="session")
def prefect_harness() -> Iterator[str]:
    """A temporary Prefect server for the whole session (started on first use; 10-40 s on a
    busy two-core machine); yields its API URL. In-process flow runs, `get_client()` and
    artifacts all go to it."""
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    # Prefect's own startup timeout (30 s) is too short for a busy CI machine with two cores.
    with prefect_test_harness(server_startup_timeout=120):
        yield str(prefect.settings.PREFECT_API_URL.value())


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
    """``factory(name)``: a new git-committed copy of the project in a temporary folder, as a
    fresh clone (no data, no store). Most tests want ``pipeline_workspace`` instead."""
    return lambda name: make_workspace(tmp_path_factory.mktemp(name))


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    return list(TINY_PARAMS)  # for a workspace not prepared with them


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite store with its tables created and nothing in it. Creating the tables
    costs 10-20 s on a busy machine; tests copy this file instead."""
    from mlflow.tracking import MlflowClient

    db = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    MlflowClient(f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture(scope="session")
def prepared_workspace(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> Path:
    """A workspace with TINY_PARAMS written into params.yaml (and committed), its data stages
    reproduced by the real `dvc` CLI and an empty MLflow store created. Built once per session
    (about a minute on a busy two-core machine); tests work on copies (``pipeline_workspace``)
    in which `dvc repro` has nothing to do."""
    from flows.params import write_params

    t0 = time.monotonic()
    ws = make_workspace(tmp_path_factory.mktemp("prepared-workspace"))
    write_params(ws / "params.yaml", list(TINY_PARAMS))
    git(ws, "commit", "-q", "-am", "tiny parameters")
    result = run_dvc(ws, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    # Every copy starts with an empty but initialised tracking store.
    shutil.copy2(empty_mlflow_db, ws / "mlflow.db")
    print(f"\nprepared workspace {ws} built in {time.monotonic() - t0:.0f} s")
    return ws


def _copies(prepared: Path, folder: Callable[[str], Path]) -> Callable[[str], Path]:
    """``make(name)``: a fresh copy of the prepared workspace (git, DVC cache, data, store)."""
    return lambda name="ws": Path(shutil.copytree(prepared, folder(name), symlinks=True))


@pytest.fixture
def pipeline_workspace(prepared_workspace: Path, tmp_path: Path) -> Callable[[str], Path]:
    """``make(name)``: a copy of the prepared workspace for one test."""
    return _copies(prepared_workspace, lambda name: tmp_path / name)


@pytest.fixture(scope="module")
def module_workspace(prepared_workspace: Path, tmp_path_factory) -> Callable[[str], Path]:
    """``make(name)``: a copy of the prepared workspace for a module-scoped scenario."""
    return _copies(prepared_workspace, lambda name: tmp_path_factory.mktemp(name) / "ws")


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
        proc = spawn(name, cmd, logs / f"{name}.log", env, cwd)
        started.append(proc)
        return proc

    yield start
    for proc in reversed(started):
        proc.stop()
