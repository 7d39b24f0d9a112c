"""Fetch faults: a source that fails twice then works is retried with backoff and the fetch
succeeds; a source that never works ends with one clear error and the previous data stays as
it was.

Both are checked twice: in-process through ``fetch_raw`` (exact backoff schedule, staging
clean-up), and end to end through the real `dvc repro fetch` of a pipeline workspace, where
the faulty sources are registered in the stage's own process by a ``sitecustomize`` module on
PYTHONPATH (the stage runs in a child process of DVC, so nothing else can reach it).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
import yaml

from flows.params import write_params
from vae_core.data import FetchError
from vae_core.data.sources import RAW_FILES, fetch_raw

SITECUSTOMIZE = '''
"""Test-only data sources for the fetch stage (see tests/reliability/test_fetch_faults.py)."""
import os
import shutil
import time
from pathlib import Path

try:
    from vae_core.data import sources as _sources
except Exception:  # not every Python process started with this PYTHONPATH has vae_core
    _sources = None

if _sources is not None and os.environ.get("FLAKY_LOG"):
    _calls = {"n": 0}

    def _log() -> None:
        with open(os.environ["FLAKY_LOG"], "a") as f:
            f.write(f"{time.monotonic()}\\n")

    def flaky(dataset, staging):
        """Fails twice (a reset connection), then copies good IDX files in."""
        _calls["n"] += 1
        _log()
        if _calls["n"] <= 2:
            raise ConnectionResetError("connection reset by peer (injected)")
        for p in Path(os.environ["FLAKY_GOOD"]).iterdir():
            shutil.copyfile(p, staging / p.name)

    def unreachable(dataset, staging):
        """Never answers."""
        _log()
        raise TimeoutError("timed out after 30 s (injected)")

    _sources.SOURCES["flaky"] = flaky
    _sources.SOURCES["unreachable"] = unreachable
'''


# --------------------------------------------------------------------------- in-process


def good_files(src: Path, dest: Path) -> None:
    for name in RAW_FILES.values():
        shutil.copyfile(src / name, dest / name)


def test_transient_failure_is_retried_with_backoff(reliability_template: Path, tmp_path, record):
    calls, sleeps = [], []
    good = reliability_template / "data" / "raw" / "mnist"

    def flaky(dataset: str, staging: Path) -> None:
        calls.append(time.monotonic())
        if len(calls) <= 2:
            raise ConnectionError("connection refused (injected)")
        good_files(good, staging)

    manifest = fetch_raw(
        "flaky",
        "mnist",
        tmp_path / "raw" / "mnist",
        retries=3,
        backoff_s=1.5,
        sources={"flaky": flaky},
        sleep=sleeps.append,
    )
    record(
        "fetch: transient failure (in-process)",
        "fetch_raw with a source failing twice (ConnectionError) then working; retries=3, "
        "backoff_s=1.5",
        f"{len(calls)} attempts, waits {sleeps} s, fetched {manifest['counts']}",
    )
    assert len(calls) == 3
    assert sleeps == [1.5, 3.0]
    assert manifest["source"] == "flaky" and manifest["counts"] == {"train": 4000, "test": 1000}
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == ["mnist"]


def test_permanent_failure_is_clear_and_keeps_previous_data(
    reliability_template: Path, tmp_path, record, helpers
):
    dest = tmp_path / "raw" / "mnist"
    shutil.copytree(reliability_template / "data" / "raw" / "mnist", dest)
    before = helpers.tree_digest(dest)
    calls, sleeps = [], []

    def down(dataset: str, staging: Path) -> None:
        calls.append(1)
        (staging / RAW_FILES["train_images"]).write_bytes(b"half a download")
        raise TimeoutError("read timed out (injected)")

    with pytest.raises(FetchError) as info:
        fetch_raw(
            "down",
            "mnist",
            dest,
            retries=3,
            backoff_s=0.5,
            sources={"down": down},
            sleep=sleeps.append,
        )
    litter = sorted(p.name for p in dest.parent.iterdir() if p.name != "mnist")
    same = helpers.tree_digest(dest) == before
    record(
        "fetch: permanent failure (in-process)",
        "fetch_raw into a folder of good data from a source that always times out after "
        "writing half a file; retries=3",
        f"{len(calls)} attempts, waits {sleeps} s; FetchError {helpers.short(str(info.value))!r}; "
        f"previous data {'byte-identical' if same else 'CHANGED'}; leftovers {litter or 'none'}",
    )
    message = str(info.value)
    assert "failed after 4 attempt(s)" in message and "TimeoutError" in message
    assert "'down'" in message and "mnist" in message
    assert sleeps == [0.5, 1.0, 2.0]
    assert same and litter == []


# --------------------------------------------------------------------------- real dvc repro


@pytest.fixture(scope="module")
def dvc_fetch_ws(reliability_template: Path, tmp_path_factory, helpers):
    """A pipeline workspace plus a sitecustomize registering the faulty sources."""
    root = tmp_path_factory.mktemp("fetch-faults")
    ws = root / "ws"
    shutil.copytree(reliability_template, ws, symlinks=True)
    site = root / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    good = root / "good"
    good.mkdir()
    good_files(ws / "data" / "raw" / "mnist", good)
    return {"ws": ws, "site": site, "good": good, "root": root}


def repro_fetch(env: dict, helpers, ws: Path, log: Path) -> tuple[int, str, float]:
    import subprocess

    extra = {"PYTHONPATH": str(env["site"]), "FLAKY_LOG": str(log), "FLAKY_GOOD": str(env["good"])}
    t0 = time.monotonic()
    out = subprocess.run(
        [helpers.dvc_bin(), "repro", "fetch"],
        cwd=ws,
        env=helpers.child_env(**extra),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return out.returncode, out.stdout + out.stderr, time.monotonic() - t0


def attempt_gaps(log: Path) -> list[float]:
    stamps = [float(x) for x in log.read_text().split()] if log.exists() else []
    return [round(b - a, 2) for a, b in zip(stamps, stamps[1:], strict=False)]


def test_dvc_fetch_stage_survives_a_transient_failure(dvc_fetch_ws, helpers, record):
    import yaml

    ws = dvc_fetch_ws["ws"]
    log = dvc_fetch_ws["root"] / "flaky.log"
    write_params(
        ws / "params.yaml", ["data.source=flaky", "fetch.retries=3", "fetch.backoff_s=0.3"]
    )
    rc, output, seconds = repro_fetch(dvc_fetch_ws, helpers, ws, log)
    gaps = attempt_gaps(log)
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["fetch"]
    import json

    manifest = json.loads((ws / "data" / "raw" / "mnist" / "manifest.json").read_text())
    record(
        "fetch: transient failure (dvc repro fetch)",
        "`dvc repro fetch` in a pipeline workspace with data.source=flaky (fails twice, then "
        "works); fetch.backoff_s=0.3",
        f"exit {rc} in {seconds:.0f} s; {len(gaps) + 1} attempts, gaps {gaps} s; dvc.lock now "
        f"pins source {lock['params']['params.yaml']['data.source']!r}; "
        f"{manifest['counts']['train']} train images",
    )
    assert rc == 0, output
    assert len(gaps) == 2, gaps
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6, f"no backoff between attempts: {gaps}"
    assert lock["params"]["params.yaml"]["data.source"] == "flaky"
    assert manifest["source"] == "flaky"


def data_digest(helpers, ws: Path) -> dict[str, str]:
    """The data's bytes; the source fingerprint (what the source stage saw last) is not data."""
    return {k: v for k, v in helpers.tree_digest(ws / "data").items() if "source/" not in k}


def data_stages_in_lock(ws: Path) -> dict:
    """What dvc.lock pins of the data: the fetch stage's entry."""
    return yaml.safe_load((ws / "dvc.lock").read_text())["stages"]["fetch"]


def test_dvc_fetch_stage_permanent_failure_keeps_previous_data(dvc_fetch_ws, helpers, record):
    ws = dvc_fetch_ws["ws"]
    write_params(ws / "params.yaml", ["data.source=embedded"])
    rc, output, _ = repro_fetch(dvc_fetch_ws, helpers, ws, dvc_fetch_ws["root"] / "ok.log")
    assert rc == 0, output
    raw = ws / "data" / "raw" / "mnist"
    before = data_digest(helpers, ws)
    lock_before = data_stages_in_lock(ws)

    log = dvc_fetch_ws["root"] / "down.log"
    write_params(
        ws / "params.yaml", ["data.source=unreachable", "fetch.retries=2", "fetch.backoff_s=0.1"]
    )
    rc, output, seconds = repro_fetch(dvc_fetch_ws, helpers, ws, log)
    errors = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    after = data_digest(helpers, ws)
    lost = sorted(set(before) - set(after))
    raw_there = raw.is_dir()
    kept = "kept" if raw_there and after == before else f"LOST ({len(lost)} files)"
    lock_same = data_stages_in_lock(ws) == lock_before

    # What is lost can be had back from DVC's cache; say so in the table.
    write_params(ws / "params.yaml", ["data.source=embedded"])
    checkout = helpers.run_dvc(ws, "checkout", "data/raw/mnist")
    restored = data_digest(helpers, ws) == before
    record(
        "fetch: permanent failure (dvc repro fetch)",
        "`dvc repro fetch` with data.source=unreachable (always times out), retries=2, in a "
        "workspace holding good data",
        f"exit {rc} in {seconds:.0f} s, {len(attempt_gaps(log)) + 1} attempts; "
        f"{helpers.short(errors[0]) if errors else 'no error line'!r}; dvc.lock "
        f"{'unchanged' if lock_same else 'CHANGED'}; previous data "
        f"{kept}"
        f"; `dvc checkout` restores it: {restored and checkout.returncode == 0}",
    )
    assert rc != 0
    assert errors and "failed after 3 attempt(s)" in errors[0] and "TimeoutError" in errors[0]
    assert "Traceback" not in output
    assert lock_same
    assert raw_there and not lost and after == before, (
        "DVC deleted data/raw/mnist before running the failing fetch stage: declare the fetch "
        "output `persist: true` in dvc.yaml (see the report)"
    )
