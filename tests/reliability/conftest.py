"""Reliability and security suite: shared fixtures and the summary table.

Every test records one row (case | what was done | what was observed) through the
``record`` fixture; at the end of the session ``pytest_terminal_summary`` prints the rows
with each test's outcome, so a CI log shows at a glance which faults were survived and
which hostile inputs were refused.

Pipeline workspaces are built once per session (``reliability_template``): a git + DVC copy
of the project (``workspace_factory`` from tests/conftest.py) with tiny parameters written
into params.yaml, the data stages reproduced by the real ``dvc`` CLI and the MLflow SQLite
store created, so each test starts from a copy in which ``dvc repro`` has nothing to do.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN_DIR = Path(sys.executable).parent

#: Parameters of every pipeline workspace of this suite: the smallest model and evaluation that
#: still run every step (the data-stage keys are written before `dvc repro`, so runs that
#: override only train/model/evaluate/promote keys find the data stages up to date).
TINY_PARAMS = (
    "classifier.epochs=1",
    "data.val_size=200",
    "train.device=cpu",
    "train.epochs=1",
    "train.batch_size=256",
    "train.patience=0",
    "model.hidden_sizes=[32]",
    "model.latent_dim=2",
    "evaluate.iwae_k=2",
    "evaluate.iwae_test_size=50",
    "evaluate.num_samples=50",
    "promote.bootstrap_samples=20",
    "promote.floor_nll=1000",
)

ROWS_KEY = pytest.StashKey[list]()
OUTCOMES_KEY = pytest.StashKey[dict]()


# --------------------------------------------------------------------------- the table


@dataclass
class Row:
    nodeid: str
    case: str
    done: str
    observed: str


class Recorder:
    """What one test did and saw; the last call to ``__call__`` wins."""

    def __init__(self, rows: list[Row], nodeid: str):
        self._rows, self._nodeid = rows, nodeid
        self._row: Row | None = None

    def __call__(self, case: str, done: str, observed: str) -> None:
        if self._row is None:
            self._row = Row(self._nodeid, case, done, observed)
            self._rows.append(self._row)
        else:
            self._row.case, self._row.done, self._row.observed = case, done, observed

    def observe(self, observed: str) -> None:
        """Replace only the observation (a test records its plan first, then what it saw)."""
        if self._row is not None:
            self._row.observed = observed


@pytest.fixture(scope="session")
def reliability_rows(request: pytest.FixtureRequest) -> list[Row]:
    """The session's table rows (kept on the config so the summary hook can read them)."""
    return request.config.stash.setdefault(ROWS_KEY, [])


@pytest.fixture
def record(reliability_rows: list[Row], request: pytest.FixtureRequest) -> Recorder:
    """``record(case, done, observed)``: this test's row in the summary table."""
    return Recorder(reliability_rows, request.node.nodeid)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    outcomes = item.config.stash.setdefault(OUTCOMES_KEY, {})
    if report.when == "call" or (report.when == "setup" and not report.passed):
        outcomes[item.nodeid] = "skipped" if report.skipped else report.outcome
    return report


def _cell(text: str, width: int) -> list[str]:
    return textwrap.wrap(" ".join(str(text).split()), width) or [""]


def format_table(rows: list[Row], outcomes: dict[str, str]) -> str:
    """The rows as a fixed-width text table, long cells wrapped."""
    widths = (28, 40, 60, 6)
    head = ("case", "what was done", "what was observed", "result")
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"
    lines = [
        sep,
        "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |",
        sep,
    ]
    for row in rows:
        result = {"passed": "ok", "failed": "FAIL", "skipped": "skip"}.get(
            outcomes.get(row.nodeid, "?"), "?"
        )
        cells = [_cell(row.case, widths[0]), _cell(row.done, widths[1])]
        cells += [_cell(row.observed, widths[2]), [result]]
        for i in range(max(len(c) for c in cells)):
            parts = [
                (c[i] if i < len(c) else "").ljust(w) for c, w in zip(cells, widths, strict=True)
            ]
            lines.append("| " + " | ".join(parts) + " |")
        lines.append(sep)
    return "\n".join(lines)


def write_summary(terminalreporter, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS_KEY, [])
    if not rows:
        return
    outcomes = config.stash.get(OUTCOMES_KEY, {})
    terminalreporter.section("reliability and security: case | done | observed")
    terminalreporter.write_line(format_table(rows, outcomes))


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config) -> None:
    write_summary(terminalreporter, config)


# --------------------------------------------------------------------------- helpers


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (by relative path): compares trees byte for byte."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


_PATH = re.compile(r"(?<![:/\w.])(?:/[^/\s:,'\"()]+){2,}/([^/\s:,'\"()]+)")


def short(text: str, limit: int = 110) -> str:
    """The first line of an error, without `error: `, absolute paths cut to their last part."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()]
    first = lines[0] if lines else ""
    first = first.removeprefix("error: ")
    first = _PATH.sub(lambda m: m.group(1), first)
    return first if len(first) <= limit else first[: limit - 3] + "..."


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child process: this virtualenv first on PATH, nothing from the
    test process's tracking or Prefect configuration, no telemetry."""
    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PREFECT_PROFILE", "PYTHONPATH"):
        env.pop(key, None)
    env["PATH"] = str(BIN_DIR) + os.pathsep + env.get("PATH", "")
    env.update(
        {
            "DVC_NO_ANALYTICS": "1",
            "DO_NOT_TRACK": "1",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_ENABLE_TELEMETRY": "false",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
    )
    env.update(extra)
    return env


def dvc_bin() -> str:
    exe = BIN_DIR / "dvc"
    return str(exe) if exe.exists() else "dvc"


def run_dvc(root: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dvc_bin(), *args],
        cwd=root,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def helpers():
    """The helper functions above, for test modules (a conftest cannot be imported)."""
    from types import SimpleNamespace

    return SimpleNamespace(
        tree_digest=tree_digest,
        child_env=child_env,
        run_dvc=run_dvc,
        dvc_bin=dvc_bin,
        short=short,
        bin_dir=BIN_DIR,
    )


# --------------------------------------------------------------------------- workspaces


@pytest.fixture(scope="session")
def reliability_template(workspace_factory, tmp_path_factory) -> Iterator[Path]:
    """A workspace with tiny parameters, its data stages reproduced and an empty MLflow store.

    Built once (about a minute on a busy two-core machine); tests work on copies of it.
    """
    from flows.params import write_params

    t0 = time.monotonic()
    ws = workspace_factory("reliability-template")
    write_params(ws / "params.yaml", list(TINY_PARAMS))
    result = run_dvc(ws, "repro")
    assert result.returncode == 0, result.stdout + result.stderr
    # The SQLite store with its tables (creating them costs 10-20 s): every copy starts with
    # an empty but initialised tracking store, as a workspace that has run before would.
    init = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from mlflow.tracking import MlflowClient; "
            "MlflowClient(sys.argv[1]).search_experiments()",
            f"sqlite:///{ws / 'mlflow.db'}",
        ],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert init.returncode == 0, init.stderr
    print(f"\nreliability template {ws} built in {time.monotonic() - t0:.0f} s")
    yield ws


@pytest.fixture
def pipeline_workspace(reliability_template: Path, tmp_path: Path) -> Callable[[str], Path]:
    """``make(name)``: a fresh copy of the template workspace (git, DVC cache, data, store)."""

    def make(name: str = "ws") -> Path:
        dest = tmp_path / name
        shutil.copytree(reliability_template, dest, symlinks=True)
        return dest

    return make
