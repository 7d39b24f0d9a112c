"""Fixtures for the data-layer tests: small synthetic IDX datasets written on the fly (no
network, nothing from ../shared)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from vae_core.data.idx import write_idx
from vae_core.data.sources import RAW_FILES


def synthetic_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random 28x28 uint8 images with balanced labels 0..9."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def write_raw_folder(
    folder: Path, n_train: int = 120, n_test: int = 40, *, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    """Write the four standard IDX files (``.gz`` names or uncompressed names) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    train_images, train_labels = synthetic_split(n_train, seed)
    test_images, test_labels = synthetic_split(n_test, seed + 1)
    arrays = {
        "train_images": train_images,
        "train_labels": train_labels,
        "test_images": test_images,
        "test_labels": test_labels,
    }
    for key, name in RAW_FILES.items():
        write_idx(folder / (name if gz else name[: -len(".gz")]), arrays[key])
    return arrays


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path: compares folders byte for byte."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def raw_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``raw_folder(name, n_train=..., n_test=..., gz=...)`` -> a folder of IDX files."""

    def make(name: str = "src", **kwargs: object) -> Path:
        folder = tmp_path / name
        write_raw_folder(folder, **kwargs)  # type: ignore[arg-type]
        return folder

    return make


@pytest.fixture(scope="session")
def embedded_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded source fetched once per session (about a second)."""
    from vae_core.data.sources import fetch_raw

    dest = tmp_path_factory.mktemp("embedded") / "mnist"
    fetch_raw("embedded", "mnist", dest)
    return dest


@pytest.fixture
def write_raw() -> Callable[..., dict[str, np.ndarray]]:
    """The ``write_raw_folder`` helper, as a fixture (conftest modules are not importable)."""
    return write_raw_folder


@pytest.fixture
def digest() -> Callable[[Path], dict[str, str]]:
    """The ``tree_digest`` helper, as a fixture."""
    return tree_digest
