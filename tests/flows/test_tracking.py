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


def test_a_trial_that_loses_the_race_to_log_a_new_dataset_links_it_all_the_same(
    tmp_path: Path, monkeypatch
) -> None:
    """Two parallel trials log the same split at once: the later one's existence check ran
    before the earlier one's insert committed, so MLflow's store inserts it again and SQLite
    refuses the duplicate (seen in CI). Reproduced on a real store by letting that check miss
    once; the run must still get its input."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.store.tracking.dbmodels.models import SqlDataset
    from sqlalchemy.orm import Query

    client = tracking.connect(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("race")
    first, second = (client.create_run(experiment).info.run_id for _ in range(2))
    split = MetaDataset(tracking._local_source(tmp_path), name="mnist-test", digest="d1")
    tracking._log_inputs(client, first, [split], "evaluation")

    real_all, missed = Query.all, []

    def stale_once(query: Query) -> list:
        rows = real_all(query)
        if not missed and rows and isinstance(rows[0], SqlDataset):
            missed.append(rows[0].name)
            return []  # "not there yet": the other trial has not committed
        return rows

    monkeypatch.setattr(Query, "all", stale_once)
    tracking._log_inputs(client, second, [split], "evaluation")
    assert missed == ["mnist-test"]  # the race happened, and was lost once
    for run_id in (first, second):
        (linked,) = client.get_run(run_id).inputs.dataset_inputs
        assert (linked.dataset.name, linked.dataset.digest) == ("mnist-test", "d1")


def test_only_the_dataset_race_is_retried() -> None:
    from mlflow.exceptions import MlflowException

    duplicate = "(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id"
    assert tracking.lost_dataset_race(MlflowException(duplicate))
    assert tracking.lost_dataset_race(MlflowException('duplicate key value ... "dataset_pk"'))
    assert not tracking.lost_dataset_race(MlflowException("UNIQUE constraint failed: runs.x"))
    assert not tracking.lost_dataset_race(MlflowException("RESOURCE_DOES_NOT_EXIST: run"))
