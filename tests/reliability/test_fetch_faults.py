"""Fetch faults through the one retry layer: the pipeline's `fetch_data` task (real Prefect
retries) running the real `dvc repro fetch`, whose stage tries the source once. The source is an
HTTP mirror on 127.0.0.1 answering what each test scripts, a named source that a
``sitecustomize`` on PYTHONPATH registers in the stage's own process (a child of DVC)."""

import http.server
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import tree_digest

from flows import dvc_runner
from flows.params import load_params, write_params

pytestmark = pytest.mark.slow  # starts the Prefect harness and an HTTP server

SITECUSTOMIZE = '''
"""Test-only data source for the fetch stage (see tests/reliability/test_fetch_faults.py)."""
import os, urllib.request
def mirror(dataset, staging):  # the four files from MIRROR_URL; urllib's errors as they come
    for name in _sources.RAW_FILES.values():
        with urllib.request.urlopen(f"{os.environ['MIRROR_URL']}/{name}", timeout=30) as answer:
            (staging / name).write_bytes(answer.read())
if os.environ.get("MIRROR_URL"):
    try:
        from vae_core.data import sources as _sources
    except Exception:  # not every process started with this PYTHONPATH has vae_core
        _sources = None
    if _sources is not None:
        _sources.SOURCES["mirror"] = mirror
'''


class Mirror(http.server.ThreadingHTTPServer):
    """Serves the files of ``folder``; the statuses in ``script`` answer the next requests
    first. ``answers`` logs (file name, status) of every request."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.script, self.answers = folder, [], []
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class MirrorHandler(http.server.BaseHTTPRequestHandler):
    server: Mirror

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        name = self.path.strip("/")
        path = self.server.folder / name
        status = self.server.script.pop(0) if self.server.script else 200
        status = 404 if status == 200 and not path.is_file() else status
        self.server.answers.append((name, status))
        if status != 200:
            return self.send_error(status)
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:  # keep the test output quiet
        pass


@pytest.fixture(scope="module")
def mirror_ws(module_workspace, tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A prepared pipeline workspace, the mirror serving its raw files, and the sitecustomize."""
    ws = module_workspace("fetch-faults")
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    files = tmp_path_factory.mktemp("mirror")
    for path in (ws / "data" / "raw" / "mnist").glob("*.gz"):
        shutil.copyfile(path, files / path.name)
    mirror = Mirror(files)
    threading.Thread(target=mirror.serve_forever, daemon=True).start()
    yield SimpleNamespace(ws=ws, site=site, mirror=mirror)
    mirror.shutdown()  # returns once serve_forever has stopped
    mirror.server_close()


@pytest.fixture
def fetch(mirror_ws, prefect_harness, monkeypatch):
    """``fetch(script, *overrides)``: the pipeline's fetch task on the workspace, in a
    flow as the pipeline runs it, with the retry policy params.yaml's fetch section gives it
    and the mirror answering ``script`` first; returns the final state."""
    from prefect import flow

    from flows.pipeline import fetch_data

    states = []

    @flow(name="fetch-faults")
    def fetch_only(workdir: str, policy: dict) -> None:
        states.append(fetch_data.with_options(**policy)(workdir, return_state=True))

    # dvc_runner passes this process's environment down to DVC and the stage.
    monkeypatch.setenv("PYTHONPATH", str(mirror_ws.site))
    monkeypatch.setenv("MIRROR_URL", mirror_ws.mirror.url)

    def run(script: list[int], *overrides: str):
        ws, mirror = mirror_ws.ws, mirror_ws.mirror
        write_params(ws / "params.yaml", ["data.source=mirror", *overrides])
        mirror.script, mirror.answers = list(script), []
        fetch_only(str(ws), dvc_runner.fetch_retry(load_params(ws / "params.yaml").fetch))
        return states.pop()

    yield run
    mirror_ws.mirror.script = []


def data_state(ws: Path) -> tuple[dict, dict]:
    """The raw data's bytes and what dvc.lock pins of the fetch stage."""
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["fetch"]
    return tree_digest(ws / "data" / "raw" / "mnist"), lock


def test_source_failing_twice_is_retried_by_the_fetch_task(fetch, mirror_ws, record) -> None:
    state = fetch([503, 503], "fetch.retries=3", "fetch.backoff_s=0.2")
    statuses = [status for _, status in mirror_ws.mirror.answers]
    raw = mirror_ws.ws / "data" / "raw" / "mnist"
    manifest = json.loads((raw / "manifest.json").read_text())
    record(
        "fetch: transient failure",
        "fetch task (retries=3) on a mirror answering 503 twice, then the files",
        f"{state.type.value}; mirror saw {statuses}; {manifest['counts']} fetched",
    )
    assert state.is_completed(), state.result(raise_on_failure=False)
    # Three attempts, each a fresh stage: two stopped at their first 503, the third got all four.
    assert statuses == [503, 503, 200, 200, 200, 200]
    assert sorted(name for name, status in mirror_ws.mirror.answers if status == 200) == sorted(
        p.name for p in raw.glob("*.gz")
    )
    assert manifest["source"] == "mirror"
    assert manifest["counts"] == {"train": 4000, "test": 1000}
    assert data_state(mirror_ws.ws)[1]["params"]["params.yaml"]["data.source"] == "mirror"


def test_refused_source_is_bad_input_and_not_retried(fetch, mirror_ws, record) -> None:
    before = data_state(mirror_ws.ws)
    state = fetch([404], "fetch.retries=3", "fetch.backoff_s=0.2")
    error = state.result(raise_on_failure=False)
    record(
        "fetch: refused source",
        "fetch task (retries=3) on a mirror answering 404",
        f"{state.type.value}; mirror saw {mirror_ws.mirror.answers}; "
        f"{record.short(str(error).partition(': ')[2])!r}",
    )
    assert state.is_failed()
    assert isinstance(error, dvc_runner.DvcError) and error.bad_input, error
    assert mirror_ws.mirror.answers == [("train-images-idx3-ubyte.gz", 404)]  # no second try
    assert "HTTP 404" in str(error) and "train-images-idx3-ubyte.gz" in str(error)
    assert data_state(mirror_ws.ws) == before


def test_source_that_stays_down_fails_after_the_retries_and_keeps_data(fetch, mirror_ws, record):
    before = data_state(mirror_ws.ws)
    state = fetch([503] * 10, "fetch.retries=1", "fetch.backoff_s=0.1")
    error = state.result(raise_on_failure=False)
    line = next((ln for ln in str(error).splitlines() if "fetching mnist" in ln), "")
    record(
        "fetch: source stays down",
        "fetch task (retries=1) on a mirror always answering 503, over good data",
        f"{state.type.value}; mirror saw {[s for _, s in mirror_ws.mirror.answers]}; "
        f"{record.short(line)!r}; data and dvc.lock unchanged",
    )
    assert state.is_failed()
    assert isinstance(error, dvc_runner.DvcError), error
    assert error.unavailable and not error.bad_input, error
    assert mirror_ws.mirror.answers == [("train-images-idx3-ubyte.gz", 503)] * 2
    assert "HTTPError: HTTP Error 503" in line, str(error)
    assert "Traceback" not in str(error)
    assert data_state(mirror_ws.ws) == before
