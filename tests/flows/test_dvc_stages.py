"""The DVC stages, end to end with the real ``dvc`` CLI in a scratch project, and each bad
input through the stage entry point: a clear ``error:`` line, exit status 2, nothing lost."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from flows import stages
from flows.lineage import LineageError, data_lineage
from flows.params import write_params
from vae_core.data import sources as src
from vae_core.data.idx import encode_idx, write_idx

# --------------------------------------------------------------------------- real dvc repro


def ran(result, stage: str) -> bool:
    return f"Running stage '{stage}'" in result.stdout


def set_params(project: Path, *overrides: str) -> None:
    write_params(project / "params.yaml", list(overrides))


DEFAULTS = (
    "data.source=embedded",
    "data.split_seed=0",
    "data.val_size=500",
    "data.holdout_size=500",
)


@pytest.fixture(scope="module")
def baseline(dvc_project: Path, dvc, digest) -> dict:
    """The default pipeline reproduced once: its params.yaml, lineage and output bytes."""
    params_text = (dvc_project / "params.yaml").read_text()
    result = dvc(dvc_project, "repro", "prepare")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ran(result, "fetch") and ran(result, "prepare")
    return {
        "first": result,
        "params": params_text,
        "lineage": data_lineage(dvc_project),
        "data": digest(dvc_project / "data"),
    }


@pytest.fixture
def project(dvc_project: Path, baseline, dvc, digest) -> Path:
    """The module's DVC project brought back to the baseline before each test, whatever an
    earlier test left (another source, another seed, failed stages): the default params.yaml,
    `dvc repro` (outputs from DVC's cache, or a cheap re-run), the baseline's bytes."""
    (dvc_project / "params.yaml").write_text(baseline["params"])
    result = dvc(dvc_project, "repro", "prepare")
    assert result.returncode == 0, result.stdout + result.stderr
    lineage = data_lineage(dvc_project)
    assert lineage["params_match_lock"] is True
    assert lineage["raw_md5"] == baseline["lineage"]["raw_md5"]
    assert lineage["processed_md5"] == baseline["lineage"]["processed_md5"]
    assert digest(dvc_project / "data") == baseline["data"]
    return dvc_project


def test_repro_on_embedded_data_then_up_to_date(project: Path, baseline, dvc) -> None:
    raw = project / "data" / "raw" / "mnist"
    processed = project / "data" / "processed" / "mnist"
    manifest = json.loads((raw / "manifest.json").read_text())
    assert manifest["counts"] == {"train": 4000, "test": 1000}
    stats = json.loads((processed / "stats.json").read_text())
    assert stats["counts"] == {"train": 3000, "val": 500, "holdout": 500, "test": 1000}
    assert (project / "dvc.lock").is_file()
    lineage = baseline["lineage"]
    assert lineage["raw_md5"].endswith(".dir") and lineage["processed_md5"].endswith(".dir")
    assert lineage["raw"]["stage"] == "fetch" and lineage["processed"]["stage"] == "prepare"
    assert lineage["params_match_lock"] is True

    again = dvc(project, "repro", "prepare")
    assert again.returncode == 0
    # Only the cheap source fingerprint runs; the same bytes behind the source: nothing else.
    assert ran(again, "source") and not ran(again, "fetch") and not ran(again, "prepare")
    assert "Stage 'fetch' didn't change, skipping" in again.stdout


def test_split_seed_reruns_prepare_only(project: Path, baseline, dvc, digest) -> None:
    set_params(project, "data.split_seed=1")
    assert data_lineage(project)["params_match_lock"] is False
    result = dvc(project, "repro", "prepare")
    assert result.returncode == 0, result.stderr
    assert ran(result, "prepare") and not ran(result, "fetch")
    lineage = data_lineage(project)
    assert lineage["raw_md5"] == baseline["lineage"]["raw_md5"]
    assert lineage["processed_md5"] != baseline["lineage"]["processed_md5"]

    set_params(project, *DEFAULTS)  # back: restored from DVC's run cache, byte for byte
    result = dvc(project, "repro", "prepare")
    assert result.returncode == 0 and not ran(result, "fetch")
    assert data_lineage(project)["processed_md5"] == baseline["lineage"]["processed_md5"]
    assert digest(project / "data") == baseline["data"]


BAD_INPUTS = {
    "truncated": "train-images-idx3-ubyte.gz: truncated or corrupt gzip",
    "val_size": "data.val_size = 4000 and data.holdout_size = 500 do not fit the training set "
    "of 4000 images",
    "dataset": "data.dataset = 'cifar' is not allowed: expected one of mnist",
}


def data_stages(project: Path) -> dict:
    """The fetch and prepare entries of dvc.lock: what pins the data (the source stage's own
    entry records the fingerprint it last saw, whatever fetch made of it)."""
    stages_lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    return {name: stages_lock[name] for name in ("fetch", "prepare")}


def test_bad_inputs_fail_clearly_and_checkout_restores(
    project: Path, baseline, dvc, digest, tmp_path: Path, write_raw
) -> None:
    params_text = (project / "params.yaml").read_text()
    data_stages_before = data_stages(project)
    write_raw(tmp_path / "idx", 1000, 200)
    f = tmp_path / "idx" / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-500])
    for bad, message in BAD_INPUTS.items():
        (project / "params.yaml").write_text(params_text)
        if bad == "truncated":
            set_params(project, f"data.source={tmp_path / 'idx'}", "data.holdout_size=100")
        elif bad == "val_size":
            set_params(project, "data.val_size=4000")
        else:  # write_params refuses bad values, so edit the file as a user would
            text = params_text.replace("dataset: mnist", "dataset: cifar")
            (project / "params.yaml").write_text(text)
        result = dvc(project, "repro", "prepare")
        assert result.returncode != 0, bad
        output = result.stdout + result.stderr
        assert "error: " in output and message in output, output
        assert "Traceback" not in output
        assert data_stages(project) == data_stages_before  # still pins good data

    # DVC removed the outputs of the stages it tried to run; restoring params.yaml and
    # checking out brings them back from the cache, byte for byte.
    (project / "params.yaml").write_text(params_text)
    restored = dvc(project, "checkout", "prepare")
    assert restored.returncode == 0, restored.stderr
    # (the source fingerprint is not data: it says what the source stage saw last)
    data = {k: v for k, v in digest(project / "data").items() if not k.startswith("source/")}
    assert data == {k: v for k, v in baseline["data"].items() if not k.startswith("source/")}
    status = dvc(project, "status", "prepare")
    assert "up to date" in status.stdout, status.stdout


def test_lineage_errors(tmp_path: Path, project: Path) -> None:
    with pytest.raises(LineageError, match=r"dvc.lock: not found.*run `dvc repro`"):
        data_lineage(tmp_path)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  fetch: {}\n")
    with pytest.raises(LineageError, match=r"expected a stage 'prepare'|records no output hash"):
        data_lineage(tmp_path, dataset="mnist")
    with pytest.raises(LineageError, match=r"records 'data/raw/mnist', expected 'data/raw/kmnist'"):
        data_lineage(project, dataset="kmnist")


def test_folder_source_reruns_both(project: Path, baseline, dvc, write_raw, tmp_path: Path) -> None:
    write_raw(tmp_path / "idx", 1000, 200)
    set_params(project, f"data.source={tmp_path / 'idx'}", "data.holdout_size=100")
    result = dvc(project, "repro", "prepare")
    assert result.returncode == 0, result.stderr
    assert ran(result, "fetch") and ran(result, "prepare")
    stats = json.loads((project / "data/processed/mnist/stats.json").read_text())
    assert stats["counts"] == {"train": 400, "val": 500, "holdout": 100, "test": 200}
    assert data_lineage(project)["raw_md5"] != baseline["lineage"]["raw_md5"]


def test_new_bytes_behind_the_same_folder_are_fetched(
    project: Path, baseline, dvc, write_raw, tmp_path: Path
) -> None:
    """The source path stays the same; the files behind it change (a new release lands)."""
    folder = tmp_path / "incoming"
    write_raw(folder, 1000, 200)
    set_params(project, f"data.source={folder}", "data.holdout_size=100", "data.split_seed=0")
    first = dvc(project, "repro", "prepare")
    assert first.returncode == 0, first.stderr
    before = data_lineage(project)
    same = dvc(project, "repro", "prepare")
    assert ran(same, "source") and not ran(same, "fetch") and not ran(same, "prepare")

    write_raw(folder, 1800, 300, seed=1)  # another valid dataset, same folder
    changed = dvc(project, "repro", "prepare")
    assert changed.returncode == 0, changed.stderr
    assert ran(changed, "fetch") and ran(changed, "prepare")
    after = data_lineage(project)
    assert after["raw_md5"] != before["raw_md5"]
    assert after["processed_md5"] != before["processed_md5"]
    stats = json.loads((project / "data/processed/mnist/stats.json").read_text())
    assert stats["counts"] == {"train": 1200, "val": 500, "holdout": 100, "test": 300}


# --------------------------------------------------------------------------- each bad input


@pytest.fixture
def stage_dir(tmp_path: Path, repo_root: Path, write_raw) -> Path:
    """A params.yaml, a good source folder and previous good raw + processed outputs."""
    (tmp_path / "params.yaml").write_text((repo_root / "params.yaml").read_text())
    set_params(tmp_path, "data.holdout_size=100")  # 1,000 images: 500 val + 100 holdout
    write_raw(tmp_path / "good", 1000, 200)
    source = f"data.source={tmp_path / 'good'}"
    assert main(tmp_path, "fetch", source) == 0
    assert main(tmp_path, "prepare") == 0
    return tmp_path


def main(root: Path, stage: str, *overrides: str) -> int:
    args = [stage, "--params", str(root / "params.yaml"), "--out", str(root / stage)]
    if stage == "prepare":
        args += ["--raw", str(root / "fetch")]
    for o in overrides:
        args += ["-S", o]
    return stages.main(args)


def break_folder(folder: Path, how: str) -> None:
    images = folder / "train-images-idx3-ubyte.gz"
    labels = folder / "t10k-labels-idx1-ubyte.gz"
    if how == "truncated":
        images.write_bytes(images.read_bytes()[:-300])
    elif how == "magic":
        data = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(b"\x08\x03" + data[2:]))
    elif how == "count":
        write_idx(folder / "train-labels-idx1-ubyte.gz", (np.arange(999) % 10).astype(np.uint8))
    elif how == "labels":
        labels.write_bytes(gzip.compress(encode_idx(np.full(200, 10, np.uint8))))
    elif how == "empty":
        for f in folder.iterdir():
            f.unlink()


@pytest.mark.parametrize(
    ("stage", "how", "message"),
    [
        ("fetch", "checksum", "t10k-images-idx3-ubyte.gz: md5 checksum mismatch"),
        ("fetch", "truncated", "train-images-idx3-ubyte.gz: truncated or corrupt gzip"),
        ("fetch", "magic", "train-images-idx3-ubyte.gz: wrong magic number: expected"),
        ("fetch", "count", "image and label counts disagree"),
        ("fetch", "labels", "t10k-labels-idx1-ubyte.gz: labels out of range: expected 0..9"),
        ("fetch", "empty", "bad is empty: expected a folder holding"),
        ("fetch", "missing", "missing does not exist: expected a folder holding"),
        ("fetch", "dataset", "data.dataset = 'svhn' is not allowed"),
        (
            "prepare",
            "val_size",
            "data.val_size = 1000 and data.holdout_size = 100 do not fit the training set of 1000",
        ),
    ],
)
def test_each_bad_input_is_a_clear_error_and_keeps_outputs(
    stage_dir: Path, write_raw, digest, capsys, monkeypatch, stage: str, how: str, message: str
) -> None:
    before = {d: digest(stage_dir / d) for d in ("fetch", "prepare")}
    capsys.readouterr()
    bad = stage_dir / "bad"
    write_raw(bad, 1000, 200)
    overrides = [f"data.source={bad}"]
    if how == "checksum":
        monkeypatch.setattr(src, "OFFICIAL_COUNTS", {"train": 1000, "test": 200})
        sums = {n: src.file_digest(bad / n, "md5") for n in src.RAW_FILES.values()}
        sums["t10k-images-idx3-ubyte.gz"] = "f" * 32
        monkeypatch.setattr(src, "published_md5", lambda dataset: sums)
    elif how == "missing":
        overrides = [f"data.source={stage_dir / 'missing'}"]
    elif how == "dataset":
        overrides = ["data.dataset=svhn"]
    elif how == "val_size":
        overrides = ["data.val_size=1000"]
    else:
        break_folder(bad, how)
    assert main(stage_dir, stage, *overrides) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert {d: digest(stage_dir / d) for d in ("fetch", "prepare")} == before


def test_workspace_paths_are_the_ones_dvc_yaml_writes(tmp_path: Path, repo_root: Path) -> None:
    from flows import workspace

    assert workspace.raw_dir(".", "kmnist").as_posix() == "data/raw/kmnist"
    assert workspace.processed_dir(tmp_path, "mnist") == tmp_path / "data/processed/mnist"
    stages_yaml = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]
    outs = {
        name: next(iter(stage["outs"][0])).replace("${data.dataset}", "fashion-mnist")
        for name, stage in stages_yaml.items()
    }
    assert outs == {
        "source": workspace.source_file(".", "fashion-mnist").as_posix(),
        "fetch": workspace.raw_dir(".", "fashion-mnist").as_posix(),
        "prepare": workspace.processed_dir(".", "fashion-mnist").as_posix(),
        "classifier": workspace.classifier_dir(".", "fashion-mnist").as_posix(),
    }


def test_stages_module_stays_light(repo_root: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, flows.stages; "
        "bad = [m for m in ('prefect', 'mlflow', 'dvc', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=repo_root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
