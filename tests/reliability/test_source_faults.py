"""Bad input between scheduled runs (the source folder gone, then a file truncated): each run
fails at once (no retries: the same input would fail the same way) with an error naming the
folder or the file, and the last good data, dvc.lock's data entries and the champion stay."""

import shutil
from pathlib import Path

import yaml
from helpers import tree_digest, write_idx_folder
from test_pipeline_faults import registry_state, run_cli

from flows.params import write_params


def data_state(ws: Path) -> dict:
    """The data and what dvc.lock pins of it (the source fingerprint is not data)."""
    files = {k: v for k, v in tree_digest(ws / "data").items() if "source/" not in k}
    stages = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    return {"files": files, "lock": {s: stages[s] for s in ("fetch", "prepare")}}


def test_bad_source_between_runs_fails_clearly_and_keeps_data_and_champion(
    prefect_harness, isolated_mlflow_uri, pipeline_workspace, tmp_path, record
) -> None:
    ws, folder = pipeline_workspace("bad-source"), tmp_path / "incoming"
    write_idx_folder(folder, 1000, 200, learnable=True)
    overrides = [f"data.source={folder}", "data.val_size=200", "data.holdout_size=200"]
    write_params(ws / "params.yaml", overrides)
    rc, err, exc, _ = run_cli(["run", "--workdir", str(ws)])
    assert exc is None and rc == 0, err[-3000:]
    good, registry = data_state(ws), registry_state(ws)
    assert registry["aliases"].get("champion") is not None
    observed = []

    def check(case: str, named: str) -> None:
        rc, err, exc, seconds = run_cli(["run", "--workdir", str(ws)])
        first = next((ln for ln in err.splitlines() if ln.startswith("error: ")), "")
        observed.append(f"{case}: exit {rc} in {seconds:.0f} s, {record.short(first, 80)!r}")
        assert exc is None, f"{case}: uncaught {type(exc).__name__}: {exc}"
        assert rc == 2 and first, f"{case}: {err[-3000:]}"
        assert named in first, f"{case}: the error line does not name {named}:\n{err[-3000:]}"
        assert "Traceback" not in err
        assert data_state(ws) == good, f"{case}: the last good data changed"
        assert registry_state(ws) == registry, f"{case}: the registry changed"

    shutil.move(folder, tmp_path / "moved-away")
    check("folder gone", str(folder))
    shutil.copytree(tmp_path / "moved-away", folder)
    images = folder / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-500])
    check("images truncated", images.name)
    record(
        "fault: bad source between runs",
        "`vae-pipeline run` on a folder source after a good run: folder removed, then back "
        "with a truncated train-images file",
        "; ".join(observed) + "; data, dvc.lock data entries and champion unchanged",
    )
