"""The workspace block (`flows.workspace.exclusive`): params.yaml and dvc.lock are put back
after a failed run, and after a run killed outright (SIGKILL: nothing of its own can run) the
next run puts them back from the journal and learns who died.

The kill lands at a point the holder reports ("holding": overrides written, journal on disk),
never on a timer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from flows import workspace
from flows.params import load_params

REPO_ROOT = Path(__file__).resolve().parents[2]

HOLDER = """
import signal, sys
from flows import workspace
with workspace.exclusive(sys.argv[1], ["train.epochs=3"], {"prefect.flow_run_id": "fr-1"}):
    workspace.note_holder(sys.argv[1], {"mlflow.run_id": "run-1"})
    (__import__("pathlib").Path(sys.argv[1]) / "dvc.lock").write_text("changed by the run\\n")
    print("holding", flush=True)
    signal.pause()
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    shutil.copy2(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.lock").write_bytes(b"schema: '2.0'\r\nstages: {}\r\n")  # CRLF kept
    return tmp_path


def _snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        name: (root / name).read_bytes() if (root / name).exists() else None
        for name in ("params.yaml", "dvc.lock")
    }


def _epochs(root: Path) -> int:
    return load_params(root / "params.yaml").train.epochs


def _kill_while_holding(root: Path) -> int:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert proc.stdout.readline().strip() == "holding"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.pid


def test_a_killed_run_is_undone_by_the_next(root: Path) -> None:
    before = _snapshot(root)
    pid = _kill_while_holding(root)
    # What the dead run left: its overrides, its dvc.lock, its journal.
    assert _epochs(root) == 3
    assert (root / "dvc.lock").read_text() == "changed by the run\n"
    assert (root / workspace.JOURNAL_NAME).is_file()

    seen: list[dict] = []
    with workspace.exclusive(root, on_recovered=seen.append) as params:
        assert _snapshot(root) == before  # put back before this run's body starts
        assert params.train.epochs != 3
    (dead,) = seen
    assert dead["pid"] == pid and dead["prefect.flow_run_id"] == "fr-1"
    assert dead["mlflow.run_id"] == "run-1"
    assert not (root / workspace.JOURNAL_NAME).exists()
    assert _snapshot(root) == before


def test_a_file_the_dead_run_created_is_removed(root: Path) -> None:
    (root / "dvc.lock").unlink()
    _kill_while_holding(root)
    assert (root / "dvc.lock").exists()
    assert workspace.recover(root) is not None
    assert not (root / "dvc.lock").exists()
    assert workspace.recover(root) is None  # nothing left to undo


def test_a_failed_run_puts_the_files_back_itself(root: Path) -> None:
    before = _snapshot(root)
    with pytest.raises(RuntimeError, match="boom"), workspace.exclusive(root, ["train.epochs=3"]):
        journal = json.loads((root / workspace.JOURNAL_NAME).read_text())
        assert journal["holder"]["pid"] == os.getpid()
        assert _epochs(root) == 3
        raise RuntimeError("boom")
    assert _snapshot(root) == before
    assert not (root / workspace.JOURNAL_NAME).exists()


def test_a_finished_run_keeps_its_overrides_and_no_journal(root: Path) -> None:
    seen: list[dict] = []
    with workspace.exclusive(root, ["train.epochs=3"], on_recovered=seen.append):
        pass
    assert _epochs(root) == 3
    assert not (root / workspace.JOURNAL_NAME).exists() and seen == []


def test_the_pull_step_enters_the_clone_the_worker_names(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("VAE_WORKSPACE", str(root))
    assert workspace.enter_from_env() == {"directory": str(root.resolve())}
    assert Path.cwd() == root.resolve()


@pytest.mark.parametrize("value", [None, "", "/nonexistent/clone"])
def test_the_pull_step_refuses_a_worker_without_a_clone(
    value: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO_ROOT)
    if value is None:
        monkeypatch.delenv("VAE_WORKSPACE", raising=False)
    else:
        monkeypatch.setenv("VAE_WORKSPACE", value)
    with pytest.raises(NotADirectoryError, match="needs VAE_WORKSPACE in its environment") as err:
        workspace.enter_from_env()
    assert ("is not set" if not value else repr(value)) in str(err.value)
    assert Path.cwd() == REPO_ROOT
