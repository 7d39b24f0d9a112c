"""Which errors mean "the tracking server hiccupped" (the sweep's trial is then resumable and
retried) and which mean the work itself failed. The errors are the ones MLflow's client and
`requests` raise for real responses of each status."""

from __future__ import annotations

import pytest
import requests
from mlflow.utils.rest_utils import verify_rest_response

from flows.tracking import server_hiccup

ENDPOINT = "/api/2.0/mlflow/runs/get"


def _response(status: int, body: bytes, content_type: str) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    response.headers["Content-Type"] = content_type
    response.url = f"http://127.0.0.1:5000{ENDPOINT}"
    return response


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
    response = _response(status, body, content_type)
    assert server_hiccup(_raised(lambda: verify_rest_response(response, ENDPOINT))) is hiccup
    assert server_hiccup(_raised(response.raise_for_status)) is hiccup  # artifact uploads


def test_no_answer_at_all() -> None:
    error = _raised(lambda: requests.get("http://127.0.0.1:9/api/2.0/mlflow/runs/get", timeout=5))
    assert isinstance(error, requests.exceptions.ConnectionError)
    assert server_hiccup(error)


@pytest.mark.parametrize(
    "error", [ValueError("loss is NaN"), FileNotFoundError("data"), KeyboardInterrupt()]
)
def test_the_work_s_own_errors(error: BaseException) -> None:
    assert not server_hiccup(error)
