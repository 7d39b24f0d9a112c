"""Fixtures for the orchestration-side data tests: the repo root, a scratch DVC project with
this repo's data code, and small IDX folders written on the fly (no network, no ../shared)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

#: What a scratch DVC project needs: the pipeline files and the code its stages run.
#: What a scratch DVC project needs: the pipeline definition and the code its stages run (every
#: module of both packages, so a stage's imports and dvc.yaml's code deps are all there).
PROJECT_FILES = (
    "dvc.yaml",
    "params.yaml",
    *sorted(
        p.relative_to(REPO_ROOT).as_posix()
        for pkg in ("flows", "vae_core")
        for p in (REPO_ROOT / pkg).rglob("*.py")
    ),
)


def write_raw_folder(folder: Path, n_train: int = 1000, n_test: int = 200, seed: int = 0) -> None:
    """The four standard .gz IDX files with random images and balanced labels."""
    from vae_core.data.idx import write_idx
    from vae_core.data.sources import RAW_FILES

    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in RAW_FILES.items():
        write_idx(folder / name, arrays[key])


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def make_project(root: Path) -> Path:
    """Copy the pipeline and its code into ``root`` (package __init__ files kept empty so the
    scratch project does not depend on what else the packages import)."""
    for rel in PROJECT_FILES:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, dest)
    for pkg in ("flows", "vae_core"):
        (root / pkg / "__init__.py").write_text("")
    return root


def project_env() -> dict[str, str]:
    """Environment for subprocesses: `python` in a stage command must be this interpreter."""
    env = dict(os.environ)
    env["DVC_NO_ANALYTICS"] = "1"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("PYTHONPATH", None)
    return env


def dvc_bin() -> str:
    exe = Path(sys.executable).parent / "dvc"
    return str(exe) if exe.exists() else "dvc"


def run_dvc(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``dvc`` CLI in ``root``."""
    return subprocess.run(
        [dvc_bin(), *args],
        cwd=root,
        env=project_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def write_raw() -> Callable[..., None]:
    return write_raw_folder


@pytest.fixture(scope="session")
def digest() -> Callable[[Path], dict[str, str]]:
    return tree_digest


@pytest.fixture(scope="session")
def dvc() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_dvc


@pytest.fixture(scope="module")
def dvc_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch DVC project (``dvc init --no-scm``) holding this repo's pipeline."""
    if shutil.which(dvc_bin()) is None and not Path(dvc_bin()).exists():
        pytest.skip("dvc is not installed")
    root = make_project(tmp_path_factory.mktemp("dvcproj"))
    result = run_dvc(root, "init", "--no-scm", "-q")
    assert result.returncode == 0, result.stderr
    return root
