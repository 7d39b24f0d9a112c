"""flows.tracking: where runs go (never leaking from one workspace to the next in the same
process), and which errors, as MLflow's client and `requests` raise them for real responses,
mean "the tracking server hiccupped" (the sweep's trial is resumable) rather than a failure."""

import os
from pathlib import Path

import mlflow
import pytest
import requests
from helpers import free_port
from mlflow.utils.rest_utils import verify_rest_response

from flows import tracking
from flows.tracking import server_hiccup

pytestmark = pytest.mark.usefixtures("isolated_mlflow_uri")  # the global URI given back


def test_connect_does_not_change_what_the_next_workspace_resolves(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    client = tracking.connect(tracking.resolve_uri(a))
    assert client.tracking_uri == f"sqlite:///{a.resolve() / 'mlflow.db'}"
    assert mlflow.get_tracking_uri() == client.tracking_uri  # the fluent API follows
    # mlflow.set_tracking_uri exports the variable; connect puts it back.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.resolve_uri(b) == f"sqlite:///{b.resolve() / 'mlflow.db'}"


def test_a_user_set_uri_wins_and_stays_set(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_uri(tmp_path) == "http://127.0.0.1:5999"
    tracking.connect(f"sqlite:///{tmp_path / 'other.db'}")
    assert tracking.resolve_uri(tmp_path) == "http://127.0.0.1:5999"


ENDPOINT = "/api/2.0/mlflow/runs/get"


def _raised(call) -> Exception:
    with pytest.raises(Exception) as caught:
        call()
    return caught.value


CASES = [
    # (status, body, content type, a hiccup?)
    (401, b"You are not authenticated.", "text/plain", True),  # auth app, database restarting
    (503, b"Service Unavailable", "text/plain", True),  # the store, database restarting
    (500, b"Internal Server Error", "text/plain", True),
    (403, b'{"error_code": "PERMISSION_DENIED", "message": "no"}', "application/json", False),
    (404, b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "x"}', "application/json", False),
    (400, b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "x"}', "application/json", False),
]


@pytest.mark.parametrize(("status", "body", "content_type", "hiccup"), CASES)
def test_rest_answers(status: int, body: bytes, content_type: str, hiccup: bool) -> None:
    response = requests.Response()  # as `requests` builds it from a real answer
    response.status_code, response._content = status, body
    response.headers["Content-Type"] = content_type
    response.url = f"http://127.0.0.1:5000{ENDPOINT}"
    assert server_hiccup(_raised(lambda: verify_rest_response(response, ENDPOINT))) is hiccup
    assert server_hiccup(_raised(response.raise_for_status)) is hiccup  # artifact uploads


def test_no_answer_at_all() -> None:
    url = f"http://127.0.0.1:{free_port()}{ENDPOINT}"  # nobody listens there
    error = _raised(lambda: requests.get(url, timeout=5))
    assert isinstance(error, requests.exceptions.ConnectionError) and server_hiccup(error)


@pytest.mark.parametrize(
    "error", [ValueError("loss is NaN"), FileNotFoundError("data"), KeyboardInterrupt()]
)
def test_the_work_s_own_errors(error: BaseException) -> None:
    assert not server_hiccup(error)
