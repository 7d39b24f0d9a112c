"""The workspace block (`flows.workspace.exclusive`): params.yaml and dvc.lock are put back
after a failed run, and after a run SIGKILLed (at a point the holder reports, never on a timer)
the next run puts them back from the journal and learns who died."""

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pytest
from helpers import REPO_ROOT, child_env, wait_for

from flows import workspace
from flows.params import load_params

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
    files = [root / "params.yaml", root / "dvc.lock"]
    return {f.name: f.read_bytes() if f.exists() else None for f in files}


def _epochs(root: Path) -> int:
    return load_params(root / "params.yaml").train.epochs


@pytest.fixture
def kill_while_holding(start_process):
    """``kill(root)``: a holder in another process, SIGKILLed once it reports it holds the
    workspace; returns its pid."""

    def kill(root: Path) -> int:
        cmd = [sys.executable, "-c", HOLDER, str(root)]
        holder = start_process(f"holder-{root.name}", cmd, env=child_env(), cwd=REPO_ROOT)
        wait_for("the holder to hold", lambda: "holding" in holder.tail(), 120, holder, 0.1)
        os.kill(holder.popen.pid, signal.SIGKILL)
        holder.popen.wait(60)
        return holder.popen.pid

    return kill


def test_a_killed_run_is_undone_by_the_next(root: Path, kill_while_holding) -> None:
    before = _snapshot(root)
    pid = kill_while_holding(root)
    # What the dead run left: its overrides, its dvc.lock, its journal.
    assert _epochs(root) == 3 and (root / "dvc.lock").read_text() == "changed by the run\n"
    assert (root / workspace.JOURNAL_NAME).is_file()

    seen: list[dict] = []
    with workspace.exclusive(root, on_recovered=seen.append) as params:
        assert _snapshot(root) == before  # put back before this run's body starts
        assert params.train.epochs != 3
    (dead,) = seen
    keys = ("pid", "prefect.flow_run_id", "mlflow.run_id")
    assert [dead[k] for k in keys] == [pid, "fr-1", "run-1"]
    assert _snapshot(root) == before and not (root / workspace.JOURNAL_NAME).exists()


def test_a_file_the_dead_run_created_is_removed(root: Path, kill_while_holding) -> None:
    (root / "dvc.lock").unlink()
    kill_while_holding(root)
    assert (root / "dvc.lock").exists()
    assert workspace.recover(root) is not None
    assert not (root / "dvc.lock").exists()
    assert workspace.recover(root) is None  # nothing left to undo


def test_a_failed_run_puts_the_files_back_itself_a_finished_one_keeps_them(root: Path) -> None:
    before = _snapshot(root)
    with pytest.raises(RuntimeError, match="boom"), workspace.exclusive(root, ["train.epochs=3"]):
        journal = json.loads((root / workspace.JOURNAL_NAME).read_text())
        assert journal["holder"]["pid"] == os.getpid() and _epochs(root) == 3
        raise RuntimeError("boom")
    assert _snapshot(root) == before and not (root / workspace.JOURNAL_NAME).exists()

    seen: list[dict] = []
    with workspace.exclusive(root, ["train.epochs=3"], on_recovered=seen.append):
        pass
    assert _epochs(root) == 3 and seen == []  # the overrides stay, like `dvc exp run -S`
    assert not (root / workspace.JOURNAL_NAME).exists()


@pytest.mark.parametrize("value", ["the clone", None, "", "/nonexistent/clone"])
def test_the_pull_step_enters_the_clone_the_worker_names_or_refuses(value, root, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.delenv("VAE_WORKSPACE", raising=False)
    if value == "the clone":
        monkeypatch.setenv("VAE_WORKSPACE", str(root))
        assert workspace.enter_from_env() == {"directory": str(root.resolve())}
        assert Path.cwd() == root.resolve()
        return
    if value is not None:
        monkeypatch.setenv("VAE_WORKSPACE", value)
    with pytest.raises(NotADirectoryError, match="needs VAE_WORKSPACE in its environment") as err:
        workspace.enter_from_env()
    assert ("is not set" if not value else repr(value)) in str(err.value)
    assert Path.cwd() == REPO_ROOT
