"""Fixtures for the data-layer tests (no network, nothing from ../shared); the synthetic IDX
folders come from ``helpers.write_idx_folder``."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def embedded_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded source fetched once per session (about a second)."""
    from vae_core.data.sources import fetch_raw

    dest = tmp_path_factory.mktemp("embedded") / "mnist"
    fetch_raw("embedded", "mnist", dest)
    return dest
