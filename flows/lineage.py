"""Data lineage of the workspace: which exact bytes (DVC md5) the raw and processed data are.

Read from ``dvc.lock``, which ``dvc repro`` writes after each stage; DVC has no stable Python
API for this, and the lock file is the record that a commit pins. The tracking layer stores
these hashes on every run and model version, so a model names the data it learned from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from flows.params import read_yaml_mapping
from flows.workspace import processed_dir, raw_dir
from vae_core.errors import VaeError

RAW_STAGE = "fetch"
PROCESSED_STAGE = "prepare"


class LineageError(VaeError, RuntimeError):
    """dvc.lock is missing, unreadable, or does not record the data stages."""


def _stage_out(
    lock: dict[str, Any], stage: str, expected: str, dataset: str, lock_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stage's entry and its data output (found by path: a stage also lists its metrics
    files among its outs)."""
    stages = lock.get("stages")
    if not isinstance(stages, dict) or stage not in stages:
        known = sorted(stages) if isinstance(stages, dict) else []
        raise LineageError(
            f"{lock_path}: expected a stage {stage!r}, found stages {known}; run `dvc repro`"
        )
    outs = [o for o in stages[stage].get("outs") or [] if isinstance(o, dict)]
    if not outs or "md5" not in outs[0]:
        raise LineageError(f"{lock_path}: stage {stage!r} records no output hash; run `dvc repro`")
    out = next((o for o in outs if Path(str(o.get("path"))).as_posix() == expected), None)
    if out is None or "md5" not in out:
        raise LineageError(
            f"{lock_path}: stage {stage!r} records {outs[0].get('path')!r}, expected {expected!r} "
            f"for dataset {dataset!r}; run `dvc repro` for this dataset"
        )
    return stages[stage], out


def model_code_hash() -> str:
    """A digest of the model code: every module of the installed ``vae_core`` package (the
    networks, objectives, trainer and evaluation), path and bytes.

    This is what "the model code changed" means for deciding whether to retrain: the library
    that defines what is trained and how it is scored. Orchestration (``flows``), docs, tests
    and the README are not part of it, so a commit that touches only those retrains nothing.
    """
    import hashlib

    import vae_core

    package = Path(vae_core.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def data_lineage(repo_root: str | os.PathLike[str] = ".", dataset: str | None = None) -> dict:
    """The DVC md5 of the raw and processed outputs recorded in ``dvc.lock``.

    ``dataset`` defaults to ``data.dataset`` in params.yaml; the lock must record that dataset's
    paths. ``params_match_lock`` tells whether params.yaml still has the values the lock was
    made with (False means ``dvc repro`` has not been run since an edit, so the hashes describe
    the previous data).
    """
    root = Path(repo_root)
    lock_path = root / "dvc.lock"
    if not lock_path.is_file():
        raise LineageError(
            f"{lock_path}: not found: expected the lock file that `dvc repro` writes; run "
            "`dvc repro` (or `dvc pull` in a fresh clone) first"
        )
    lock = read_yaml_mapping(lock_path, "the DVC lock file", LineageError)
    params_path = root / "params.yaml"
    params = (
        read_yaml_mapping(params_path, "parameters", LineageError) if params_path.is_file() else {}
    )
    if dataset is None:
        dataset = (params.get("data") or {}).get("dataset")
        if not dataset:
            raise LineageError(
                f"{params_path}: expected data.dataset to name the dataset, found none; pass "
                "dataset= explicitly"
            )

    result: dict[str, Any] = {"dataset": dataset, "dvc_lock": str(lock_path)}
    in_sync = True
    for role, stage, expected in (
        ("raw", RAW_STAGE, raw_dir(".", dataset).as_posix()),
        ("processed", PROCESSED_STAGE, processed_dir(".", dataset).as_posix()),
    ):
        entry, out = _stage_out(lock, stage, expected, dataset, lock_path)
        result[role] = {
            "stage": stage,
            "path": out["path"],
            "md5": out["md5"],
            "size": out.get("size"),
            "nfiles": out.get("nfiles"),
        }
        result[f"{role}_md5"] = out["md5"]
        locked = (entry.get("params") or {}).get("params.yaml") or {}
        for dotted, value in locked.items():
            section, _, key = dotted.partition(".")
            if (params.get(section) or {}).get(key) != value:
                in_sync = False
    result["params_match_lock"] = in_sync
    stats = root / result["processed"]["path"] / "stats.json"
    try:
        result["counts"] = json.loads(stats.read_text())["counts"]
    except (OSError, ValueError, KeyError):
        result["counts"] = None  # not pulled here: the md5 still names the data
    return result
