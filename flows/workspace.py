"""The workspace a run changes: where each stage's outputs live, and the one-run-at-a-time
block around params.yaml and dvc.lock that the pipeline and the sweep share.

Paths are relative to the project folder (``root``) and follow ``data.dataset``, as dvc.yaml
writes them, so switching datasets keeps separate, separately cached outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from flows.params import Params, load_params, write_params
from vae_core.atomic import atomic_write_bytes

LOCK_NAME = ".vae-pipeline.lock"
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


@contextmanager
def exclusive(root: str | Path, overrides: Sequence[str] = ()) -> Iterator[Params]:
    """Hold the workspace lock, write the overrides into params.yaml and yield the params.

    Like `dvc exp run -S`: overrides go into params.yaml so the DVC stages see them. A run
    started meanwhile waits for the lock. If the body fails (or is interrupted), params.yaml
    and dvc.lock are put back byte for byte, so the next (nightly) run does not silently
    inherit a failed run's overrides.
    """
    root = Path(root)
    params_file = root / PARAMS_NAME
    with FileLock(str(root / LOCK_NAME)):
        saved = {p: p.read_bytes() for p in (params_file, root / DVC_LOCK_NAME) if p.is_file()}
        try:
            yield write_params(params_file, overrides) if overrides else load_params(params_file)
        except BaseException:
            for path, content in saved.items():
                atomic_write_bytes(path, content)
            raise
