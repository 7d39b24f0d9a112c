"""The workspace a run changes: where each stage's outputs live, and the one-run-at-a-time
block around params.yaml and dvc.lock that the pipeline and the sweep share.

Paths are relative to the project folder (``root``) and follow ``data.dataset``, as dvc.yaml
writes them, so switching datasets keeps separate, separately cached outputs.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock

from flows.params import Params, load_params, write_params
from vae_core.atomic import atomic_write_bytes, atomic_write_text

LOCK_NAME = ".vae-pipeline.lock"
#: Exists only while a run holds the workspace: what to put back if that run dies.
JOURNAL_NAME = ".vae-pipeline.journal.json"
PARAMS_NAME = "params.yaml"
DVC_LOCK_NAME = "dvc.lock"


def source_file(root: str | Path, dataset: str) -> Path:
    """The source stage's output: a fingerprint of the bytes behind data.source."""
    return Path(root) / "data" / "source" / f"{dataset}.json"


def raw_dir(root: str | Path, dataset: str) -> Path:
    """The fetch stage's output: the four IDX files and manifest.json."""
    return Path(root) / "data" / "raw" / dataset


def processed_dir(root: str | Path, dataset: str) -> Path:
    """The prepare stage's output: the splits as .npy arrays, indices and stats."""
    return Path(root) / "data" / "processed" / dataset


def classifier_dir(root: str | Path, dataset: str) -> Path:
    """The classifier stage's output: the feature network of the sample-quality metrics."""
    return Path(root) / "data" / "classifier" / dataset


def run_dir(root: str | Path, run_id: str) -> Path:
    """A run's working folder: checkpoints, the saved model, the evaluation files."""
    return Path(root) / "runs" / run_id


def _holder_record(holder: Mapping[str, str]) -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        **holder,
    }


def _write_journal(root: Path, record: dict[str, Any]) -> None:
    atomic_write_text(root / JOURNAL_NAME, json.dumps(record, indent=2) + "\n")


def note_holder(root: str | Path, fields: Mapping[str, str]) -> None:
    """Add to the journal what a crash would leave unfinished (say, the MLflow run id), so the
    next run can close it. Only while holding the workspace (inside `exclusive`)."""
    root = Path(root)
    record = json.loads((root / JOURNAL_NAME).read_text())
    record["holder"] |= fields
    _write_journal(root, record)


def _restore(root: Path, files: Mapping[str, str | None]) -> None:
    """Put params.yaml and dvc.lock back as recorded (a file that was absent is removed)."""
    for name, content in files.items():
        if content is None:
            (root / name).unlink(missing_ok=True)
        else:
            atomic_write_bytes(root / name, content.encode())


def recover(root: str | Path) -> dict[str, Any] | None:
    """Undo what a run that died inside `exclusive` (SIGKILL, a lost machine) left: params.yaml
    and dvc.lock go back to their bytes before it, and its journal is removed. Returns what the
    dead run recorded about itself (pid, host, Prefect flow run, MLflow run), or None when the
    last run ended cleanly. Call only while holding the lock."""
    root = Path(root)
    journal = root / JOURNAL_NAME
    if not journal.is_file():
        return None
    record = json.loads(journal.read_text())
    _restore(root, record["files"])
    journal.unlink()
    return record["holder"]


def enter_from_env(variable: str = "VAE_WORKSPACE") -> dict[str, str]:
    """A Prefect pull step (prefect.yaml, `team-nightly`): run the flow in the clone the worker
    names in its environment, so one deployment serves workers whose clones live in different
    places. Resolved when the run starts, on the worker; a clear error if the worker lacks it."""
    value = os.environ.get(variable, "")
    folder = Path(value).expanduser()
    if not value or not (folder / PARAMS_NAME).is_file():
        found = f"{variable}={value!r}" if value else f"{variable} is not set"
        raise NotADirectoryError(
            f"{found}: a worker of this deployment needs {variable} in its environment, naming "
            f"its clone of the project (a folder with {PARAMS_NAME} and dvc.yaml)"
        )
    os.chdir(folder)
    return {"directory": str(folder.resolve())}


@contextmanager
def exclusive(
    root: str | Path,
    overrides: Sequence[str] = (),
    holder: Mapping[str, str] | None = None,
    on_recovered: Callable[[dict[str, Any]], None] | None = None,
) -> Iterator[Params]:
    """Hold the workspace lock, write the overrides into params.yaml and yield the params.

    Like `dvc exp run -S`: overrides go into params.yaml so the DVC stages see them. A run
    started meanwhile waits for the lock. If the body fails (or is interrupted), params.yaml
    and dvc.lock are put back byte for byte, so the next (nightly) run does not silently
    inherit a failed run's overrides.

    A run killed outright cannot put anything back, so before changing a file the run writes
    a journal (the files as they were and ``holder``: who it is). The OS frees the lock of a
    dead process; the next run finds the journal, restores the files and passes the dead
    run's record to ``on_recovered`` (which closes its Prefect and MLflow runs).
    """
    root = Path(root)
    params_file = root / PARAMS_NAME
    with FileLock(str(root / LOCK_NAME)):
        dead = recover(root)
        if dead is not None and on_recovered is not None:
            on_recovered(dead)
        saved = {
            name: (root / name).read_bytes().decode() if (root / name).is_file() else None
            for name in (PARAMS_NAME, DVC_LOCK_NAME)
        }
        _write_journal(root, {"holder": _holder_record(holder or {}), "files": saved})
        try:
            yield write_params(params_file, overrides) if overrides else load_params(params_file)
        except BaseException:
            _restore(root, saved)
            raise
        finally:
            (root / JOURNAL_NAME).unlink(missing_ok=True)
