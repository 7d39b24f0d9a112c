"""Where runs go: resolved once per flow from the user's MLFLOW_TRACKING_URI or the workspace,
and never leaking from one workspace to the next in the same process."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow

from flows import tracking


def test_connect_does_not_change_what_the_next_workspace_resolves(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    previous = mlflow.get_tracking_uri()
    a, b = tmp_path / "a", tmp_path / "b"
    try:
        client = tracking.connect(tracking.resolve_uri(a))
        assert client.tracking_uri == f"sqlite:///{a.resolve() / 'mlflow.db'}"
        assert mlflow.get_tracking_uri() == client.tracking_uri  # the fluent API follows
        # mlflow.set_tracking_uri exports the variable; connect puts it back.
        assert "MLFLOW_TRACKING_URI" not in os.environ
        assert tracking.resolve_uri(b) == f"sqlite:///{b.resolve() / 'mlflow.db'}"
    finally:
        mlflow.set_tracking_uri(previous)


def test_a_user_set_uri_wins_and_stays_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    previous = mlflow.get_tracking_uri()
    try:
        assert tracking.resolve_uri(tmp_path) == "http://127.0.0.1:5999"
        tracking.connect(f"sqlite:///{tmp_path / 'other.db'}")
        assert tracking.resolve_uri(tmp_path) == "http://127.0.0.1:5999"
    finally:
        mlflow.set_tracking_uri(previous)
