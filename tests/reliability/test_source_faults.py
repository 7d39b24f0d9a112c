"""Bad input between scheduled runs: the source folder disappears, then one of its files is
replaced by a truncated copy. Each run fails at once with an error naming the folder or the
file (no retries: the same input would fail the same way), and the last good data, dvc.lock's
data entries and the champion stay as they were."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml
from synthetic_digits import write_digit_folder
from test_pipeline_faults import registry_state, run_cli

from flows.params import write_params


def data_state(helpers, ws: Path) -> dict:
    """The data and what dvc.lock pins of it (the source fingerprint is not data)."""
    files = {k: v for k, v in helpers.tree_digest(ws / "data").items() if "source/" not in k}
    stages = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {"files": files, "lock": {s: stages[s] for s in ("fetch", "prepare")}}


def test_bad_source_between_runs_fails_clearly_and_keeps_data_and_champion(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, tmp_path, record, helpers
) -> None:
    ws = pipeline_workspace("bad-source")
    folder = tmp_path / "incoming"
    write_digit_folder(folder, 1000, 200)
    write_params(
        ws / "params.yaml",
        [f"data.source={folder}", "data.val_size=200", "data.holdout_size=200"],
    )
    rc, err, exc, _ = run_cli(["run", "--workdir", str(ws)])
    assert exc is None and rc == 0, err[-3000:]
    good = data_state(helpers, ws)
    registry = registry_state(ws)
    assert registry["aliases"].get("champion") is not None

    observed = []
    moved = tmp_path / "moved-away"
    shutil.move(folder, moved)
    cases = {"the source folder disappears": (str(folder), None)}
    shutil.copytree(moved, folder)
    images = folder / "train-images-idx3-ubyte.gz"
    cases["a file is replaced by a truncated copy"] = (images.name, images)
    shutil.rmtree(folder)
    for case, (named, truncate) in cases.items():
        if truncate is None:
            pass  # the folder is gone
        else:
            shutil.copytree(moved, folder)
            truncate.write_bytes(truncate.read_bytes()[:-500])
        rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws)])
        first = next((ln for ln in err.splitlines() if ln.startswith("error: ")), "")
        observed.append(f"{case}: exit {rc} in {seconds:.0f} s, {helpers.short(first, 80)!r}")
        assert exc is None, f"{case}: uncaught {type(exc).__name__}: {exc}"
        assert rc == 2 and first, f"{case}: {err[-3000:]}"
        assert named in first, f"{case}: the error line does not name {named}:\n{err[-3000:]}"
        assert "Traceback" not in err
        assert data_state(helpers, ws) == good, f"{case}: the last good data changed"
        assert registry_state(ws) == registry, f"{case}: the registry changed"
    record(
        "fault: bad source between runs",
        "`vae-pipeline run` on a folder source after a good run; then the folder is removed; "
        "then it comes back with a truncated train-images file",
        "; ".join(observed) + "; data, dvc.lock data entries and champion unchanged",
    )
