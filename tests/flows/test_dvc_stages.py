"""The DVC stages end to end with the real ``dvc`` CLI in a scratch project, reproduced once
per module (``baseline``; a test that changes the project works on a copy), and each bad input
through the stage entry point: a clear ``error:`` line, exit status 2, nothing lost."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from helpers import REPO_ROOT, run_dvc, run_stage, tree_digest, write_idx_folder

from flows import workspace
from flows.lineage import LineageError, data_lineage
from flows.params import write_params


def ran(result, stage: str) -> bool:
    return f"Running stage '{stage}'" in result.stdout


def repro(project: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """`dvc repro prepare` after writing ``overrides`` into params.yaml."""
    if overrides:
        write_params(project / "params.yaml", list(overrides))
    return run_dvc(project, "repro", "prepare")


def counts(project: Path) -> dict[str, int]:
    return json.loads((project / "data/processed/mnist/stats.json").read_text())["counts"]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A scratch DVC project (``dvc init --no-scm``) holding this repo's pipeline and every
    module of its code (package __init__ files kept empty, so a stage imports only what it
    needs), reproduced whole once: the run's output, lineage and data bytes."""
    root = tmp_path_factory.mktemp("dvcproj")
    packages = ("flows", "vae_core")
    code = [p.relative_to(REPO_ROOT) for pkg in packages for p in (REPO_ROOT / pkg).rglob("*.py")]
    for rel in ("dvc.yaml", "params.yaml", *code):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, root / rel)
    for pkg in packages:
        (root / pkg / "__init__.py").write_text("")
    assert run_dvc(root, "init", "--no-scm", "-q").returncode == 0
    write_params(root / "params.yaml", ["classifier.epochs=1"])
    first = run_dvc(root, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    data = tree_digest(root / "data")
    return SimpleNamespace(root=root, first=first, lineage=data_lineage(root), data=data)


@pytest.fixture
def project(baseline, tmp_path: Path) -> Path:
    """A copy of the reproduced project (data, DVC cache and run cache) for one test."""
    return Path(shutil.copytree(baseline.root, tmp_path / "project", symlinks=True))


def test_repro_on_embedded_data_then_up_to_date(baseline, project: Path, tmp_path: Path) -> None:
    assert ran(baseline.first, "fetch") and ran(baseline.first, "prepare")
    manifest = json.loads((project / "data/raw/mnist/manifest.json").read_text())
    assert manifest["counts"] == {"train": 4000, "test": 1000}
    assert counts(project) == {"train": 3000, "val": 500, "holdout": 500, "test": 1000}
    lineage = baseline.lineage
    assert lineage["raw_md5"].endswith(".dir") and lineage["processed_md5"].endswith(".dir")
    assert lineage["raw"]["stage"] == "fetch" and lineage["processed"]["stage"] == "prepare"
    assert lineage["params_match_lock"] is True

    again = repro(project)
    assert again.returncode == 0
    # Only the cheap source fingerprint runs; the same bytes behind the source: nothing else.
    assert ran(again, "source") and not ran(again, "fetch") and not ran(again, "prepare")
    assert "Stage 'fetch' didn't change, skipping" in again.stdout
    assert tree_digest(project / "data") == baseline.data

    # What lineage says of a workspace without a usable dvc.lock.
    with pytest.raises(LineageError, match=r"dvc.lock: not found.*run `dvc repro`"):
        data_lineage(tmp_path)
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  fetch: {}\n")
    with pytest.raises(LineageError, match=r"expected a stage 'prepare'|records no output hash"):
        data_lineage(tmp_path, dataset="mnist")
    with pytest.raises(LineageError, match=r"records 'data/raw/mnist', expected 'data/raw/kmnist'"):
        data_lineage(project, dataset="kmnist")


def test_split_seed_reruns_prepare_only(baseline, project: Path) -> None:
    write_params(project / "params.yaml", ["data.split_seed=1"])
    assert data_lineage(project)["params_match_lock"] is False
    result = repro(project)
    assert result.returncode == 0, result.stderr
    assert ran(result, "prepare") and not ran(result, "fetch")
    lineage = data_lineage(project)
    assert lineage["raw_md5"] == baseline.lineage["raw_md5"]
    assert lineage["processed_md5"] != baseline.lineage["processed_md5"]

    back = repro(project, "data.split_seed=0")  # restored from DVC's run cache, byte for byte
    assert back.returncode == 0 and not ran(back, "fetch")
    assert data_lineage(project)["processed_md5"] == baseline.lineage["processed_md5"]
    assert tree_digest(project / "data") == baseline.data


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


def test_bad_inputs_fail_clearly_and_checkout_restores(baseline, project, tmp_path):
    params_text = (project / "params.yaml").read_text()
    pinned = data_stages(project)
    write_idx_folder(tmp_path / "idx", 1000, 200)
    f = tmp_path / "idx" / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-500])
    edits = {"truncated": [f"data.source={f.parent}", "data.holdout_size=100"]}
    edits["val_size"] = ["data.val_size=4000"]
    for bad, message in BAD_INPUTS.items():
        (project / "params.yaml").write_text(params_text)
        if bad in edits:
            write_params(project / "params.yaml", edits[bad])
        else:  # write_params refuses bad values, so edit the file as a user would
            text = params_text.replace("dataset: mnist", "dataset: cifar")
            (project / "params.yaml").write_text(text)
        result = repro(project)
        output = result.stdout + result.stderr
        assert result.returncode != 0, bad
        assert "error: " in output and message in output, output
        assert "Traceback" not in output
        assert data_stages(project) == pinned  # still pins good data

    # DVC removed the outputs of the stages it tried to run; restoring params.yaml and
    # checking out brings them back from the cache, byte for byte.
    (project / "params.yaml").write_text(params_text)
    restored = run_dvc(project, "checkout", "prepare")
    assert restored.returncode == 0, restored.stderr

    def data(digest: dict) -> dict:  # the source fingerprint is not data: what source saw last
        return {k: v for k, v in digest.items() if not k.startswith("source/")}

    assert data(tree_digest(project / "data")) == data(baseline.data)
    status = run_dvc(project, "status", "prepare")
    assert "up to date" in status.stdout, status.stdout


def test_a_folder_source_and_new_bytes_behind_it_rerun_both(baseline, project, tmp_path):
    """Another source reruns fetch and prepare; the same path with new files behind it (a new
    release lands) too; the same bytes again run only the source fingerprint."""
    folder = tmp_path / "incoming"
    write_idx_folder(folder, 1000, 200)
    first = repro(project, f"data.source={folder}", "data.holdout_size=100")
    assert first.returncode == 0, first.stderr
    assert ran(first, "fetch") and ran(first, "prepare")
    assert counts(project) == {"train": 400, "val": 500, "holdout": 100, "test": 200}
    before = data_lineage(project)
    assert before["raw_md5"] != baseline.lineage["raw_md5"]
    same = repro(project)
    assert ran(same, "source") and not ran(same, "fetch") and not ran(same, "prepare")

    write_idx_folder(folder, 1800, 300, seed=1)  # another valid dataset, same folder
    changed = repro(project)
    assert changed.returncode == 0, changed.stderr
    assert ran(changed, "fetch") and ran(changed, "prepare")
    after = data_lineage(project)
    assert [after[k] != before[k] for k in ("raw_md5", "processed_md5")] == [True, True]
    assert counts(project) == {"train": 1200, "val": 500, "holdout": 100, "test": 300}


PREPARE = "data/metrics/mnist/prepare.json"
CLASSIFIER = "data/metrics/mnist/classifier.json"
HISTORY = "data/metrics/mnist/classifier_history.json"


def dvc_json(project: Path, *args: str) -> dict:
    result = run_dvc(project, *args, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_metrics_and_plots_show_print_the_stages_figures(baseline) -> None:
    shown = dvc_json(baseline.root, "metrics", "show")[""]["data"]
    assert sorted(shown) == [CLASSIFIER, PREPARE]
    prepare, classifier = shown[PREPARE]["data"], shown[CLASSIFIER]["data"]

    stats = json.loads((baseline.root / "data/processed/mnist/stats.json").read_text())
    assert (prepare["counts"], prepare["pixel_mean"]) == (stats["counts"], stats["pixel_mean"])
    assert sorted(prepare["pixel_mean"]) == [
        "holdout", "holdout_binarized", "test", "test_binarized", "train", "val",
    ]  # fmt: skip
    assert all(0.05 < v < 0.3 for v in prepare["pixel_mean"].values())  # MNIST: about 0.13

    recorded = json.loads((baseline.root / "data/classifier/mnist/classifier.json").read_text())
    assert sorted(classifier) == ["test_accuracy", "train_loss", "val_accuracy"]
    for name, value in classifier.items():
        assert value == recorded["metrics"][name], name
    assert 0.5 < classifier["test_accuracy"] <= 1.0  # one epoch on real digits: about 0.9

    plots = dvc_json(baseline.root, "plots", "show")["data"]
    assert list(plots) == [HISTORY]
    content = plots[HISTORY][0]["content"]
    rows = content["data"]["values"]
    assert [row["epoch"] for row in rows] == [1]
    assert content["encoding"]["x"]["field"] == "epoch"
    metrics = json.loads((baseline.root / CLASSIFIER).read_text())
    assert rows[0]["val_accuracy"] == metrics["val_accuracy"]
    assert rows[0]["train_loss"] == metrics["train_loss"]


def test_figures_are_cached_like_the_data(project: Path) -> None:
    """A clone that pulls the data gets the figures too: they are in DVC's cache, so a
    checkout brings them back and no stage has to run again for them."""
    folder = project / "data/metrics"
    before = tree_digest(folder)
    assert sorted(before) == ["mnist/classifier.json", "mnist/classifier_history.json",
                              "mnist/prepare.json"]  # fmt: skip
    for path in folder.rglob("*.json"):
        path.unlink()
    result = run_dvc(project, "checkout")
    assert result.returncode == 0, result.stdout + result.stderr
    assert tree_digest(folder) == before
    status = run_dvc(project, "status", "prepare", "classifier")
    assert status.returncode == 0 and "up to date" in status.stdout, status.stdout


@pytest.fixture(scope="module")
def good_outputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A params.yaml, a good source folder and previous good raw + processed outputs."""
    root = tmp_path_factory.mktemp("stage-outputs")
    shutil.copy2(REPO_ROOT / "params.yaml", root / "params.yaml")
    write_params(root / "params.yaml", ["data.holdout_size=100"])  # 500 val + 100 holdout
    write_idx_folder(root / "good", 1000, 200)
    assert stage(root, "fetch", f"data.source={root / 'good'}")[0] == 0
    assert stage(root, "prepare")[0] == 0
    return root


def stage(root: Path, name: str, *overrides: str) -> tuple[int, str]:
    raw = root / "fetch" if name == "prepare" else None
    return run_stage(root, name, root / name, *overrides, raw=raw)


NO_FIT = "data.val_size = 1000 and data.holdout_size = 100 do not fit the training set of 1000"


@pytest.mark.parametrize(
    ("name", "override", "message"),
    [
        ("fetch", "data.source=bad", "train-images-idx3-ubyte.gz: truncated or corrupt gzip"),
        ("fetch", "data.source=missing", "missing does not exist: expected a folder holding"),
        ("fetch", "data.dataset=svhn", "data.dataset = 'svhn' is not allowed"),
        ("prepare", "data.val_size=1000", NO_FIT),
    ],
)
def test_each_bad_input_is_a_clear_error_and_keeps_outputs(
    good_outputs: Path, tmp_path: Path, name: str, override: str, message: str
) -> None:
    """One bad input of each kind through the stage entry point; every malformed file has its
    message checked where it is read (tests/vae_core/test_idx.py, test_sources.py)."""
    root = Path(shutil.copytree(good_outputs, tmp_path / "stages"))
    before = {d: tree_digest(root / d) for d in ("fetch", "prepare")}
    write_idx_folder(root / "bad", 1000, 200)
    images = root / "bad" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:-300])
    key, value = override.split("=")
    value = str(root / value) if key == "data.source" else value  # a folder beside the outputs
    rc, err = stage(root, name, f"{key}={value}")
    assert rc == 2 and err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert {d: tree_digest(root / d) for d in ("fetch", "prepare")} == before


def test_workspace_paths_are_the_ones_dvc_yaml_writes() -> None:
    assert workspace.raw_dir(".", "kmnist").as_posix() == "data/raw/kmnist"
    assert workspace.processed_dir("/w", "mnist") == Path("/w/data/processed/mnist")
    stages_yaml = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]
    outs = {n: next(iter(stage["outs"][0])) for n, stage in stages_yaml.items()}
    paths = (workspace.source_file, workspace.raw_dir, workspace.processed_dir)
    expected = [p(".", "${data.dataset}").as_posix() for p in (*paths, workspace.classifier_dir)]
    assert list(outs) == ["source", "fetch", "prepare", "classifier"]
    assert list(outs.values()) == expected


def test_stages_module_stays_light() -> None:
    code = (
        "import sys, flows.stages; "
        "bad = [m for m in ('prefect', 'mlflow', 'dvc', 'torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr
