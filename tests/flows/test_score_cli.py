"""`vae-pipeline score` refuses bad input before anything starts: one line naming the file or
the field, exit status 2, no output file. (The scoring itself, drift and its trigger run on a
real server in tests/integration/test_drift_trigger.py.)"""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import yaml
from helpers import REPO_ROOT

from flows.cli import main

# Importing flows.scoring imports Prefect now, at collection: its console log handler would
# otherwise bind to the stream one test captures, and a later in-process flow run (below) would
# log into that closed stream.
from flows.scoring import ScoreColumns, score_columns
from vae_core.data.idx import write_idx


@pytest.fixture
def workdir(tmp_path, empty_mlflow_db, monkeypatch):
    """A project folder with params.yaml and an MLflow store that registered nothing (its own:
    not a server or store another test left in MLFLOW_TRACKING_URI)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copy(empty_mlflow_db, tmp_path / "mlflow.db")
    return tmp_path


def error_line(stderr: str) -> str:
    """The one `error: ...` line, and no traceback (other lines are libraries' own logs)."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    return errors[0]


def _npy(path, array):
    np.save(path, array)
    return path


def _truncated_npy(d):
    whole = _npy(d / "whole.npy", np.zeros((50, 28, 28), np.uint8)).read_bytes()
    (d / "cut.npy").write_bytes(whole[:3000])
    return d / "cut.npy"


def _empty_folder(d):
    (d / "in").mkdir()
    return d / "in"


def _idx_32x32(d):
    write_idx(d / "x-idx3-ubyte", np.zeros((2, 32, 32), np.uint8))
    return d


def _broken_gzip_idx(d):
    (d / "t-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08"))
    return d


#: case -> (make the input in a folder, what the one line must say)
BAD_INPUTS = {
    "missing": (lambda d: d / "nope.npy", "nope.npy: expected a .npy file"),
    "empty folder": (_empty_folder, "found no IDX or PNG image files"),
    "wrong size": (
        lambda d: _npy(d / "big.npy", np.zeros((3, 32, 32), np.uint8)),
        "big.npy: expected images of shape (N, 28, 28), (N, 1, 28, 28) or (N, 784), found "
        "(3, 32, 32)",
    ),
    "truncated": (_truncated_npy, "cut.npy: not a readable .npy file"),
    "wrong dtype": (
        lambda d: _npy(d / "int.npy", np.zeros((3, 28, 28), np.int64)),
        "int.npy: expected dtype uint8 (grey levels 0..255) or a float dtype",
    ),
    "idx of 32x32": (_idx_32x32, "x-idx3-ubyte: expected 28x28 images, found 32x32"),
    "truncated gzip idx header": (_broken_gzip_idx, "t-idx3-ubyte.gz"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_no_output(workdir, tmp_path, capsys, case) -> None:
    make, expected = BAD_INPUTS[case]
    (data := tmp_path / "data").mkdir()
    path = make(data)
    out = tmp_path / "scores.parquet"
    code = main(["score", "--input", str(path), "--out", str(out), "--workdir", str(workdir)])
    err = error_line(capsys.readouterr().err)
    assert code == 2 and expected in err, err
    assert not out.exists() and not (workdir / "scores").exists()


def test_a_model_uri_that_does_not_exist_is_one_line_exit_2(workdir, tmp_path, capsys) -> None:
    images = _npy(tmp_path / "ok.npy", np.zeros((4, 28, 28), np.uint8))
    for model, expected in (
        (None, "--model models:/mnist-vae@champion: expected a registered model version"),
        ("models:/mnist-vae/3", "--model models:/mnist-vae/3: expected a registered model"),
    ):
        args = ["score", "--input", str(images), "--workdir", str(workdir)]
        code = main(args + (["--model", model] if model else []))
        err = error_line(capsys.readouterr().err)
        assert code == 2 and expected in err, err
    assert not (workdir / "scores").exists()


def test_prefect_yaml_declares_the_drift_trigger_serve_attaches() -> None:
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    from flows.events import retrain_on_drift

    config = yaml.safe_load((REPO_ROOT / "prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["name"] == "nightly"]
    (trigger,) = [DeploymentEventTrigger.model_validate(t) for t in nightly["triggers"]]
    assert trigger == retrain_on_drift() and trigger.expect == {"vae.data.drift"}
    (score,) = [d for d in config["deployments"] if d["name"] == "score"]
    assert score["entrypoint"] == "flows/scoring.py:batch_scoring"


def test_a_grey_level_bce_model_gets_no_likelihood_columns(
    workdir, prefect_harness, tmp_path, capsys
) -> None:
    """A Bernoulli decoder trained on grey levels scores a bound of a summed BCE, not a
    likelihood: the table, the figures and the run say so (a binarized model's names are
    checked in tests/integration/test_drift_trigger.py)."""
    import mlflow
    import pandas as pd

    from flows.model_io import log_vae
    from vae_core.config import VAEConfig
    from vae_core.models.factory import build_vae

    vae = build_vae(VAEConfig(hidden_sizes=[8], latent_dim=2), seed=0)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    with mlflow.start_run():
        uri = log_vae(vae, "continuous").model_uri
    images = _npy(tmp_path / "grey.npy", np.linspace(0, 1, 5 * 784).reshape(5, 28, 28))
    out = tmp_path / "scores.parquet"
    args = ["score", "--input", str(images), "--model", uri, "--out", str(out)]
    assert main([*args, "--workdir", str(workdir), "-S", "evaluate.iwae_k=4"]) == 0
    printed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "score_mean_neg_iwae_bound_not_a_likelihood" in printed
    assert not [name for name in printed if "nll" in name]
    table = pd.read_parquet(out)
    bound = "iwae_bound_not_a_likelihood"
    assert {bound, f"neg_{bound}", "reconstruction_bce"} <= set(table.columns)
    assert not {"log_likelihood", "nll", "reconstruction_nll"} & set(table.columns)
    assert np.allclose(table[f"neg_{bound}"], -table[bound]) and len(table) == 5
    (scoring,) = mlflow.search_runs(experiment_names=["vae-mnist-scoring"], output_format="list")
    assert scoring.data.tags["score.kind"] == "not_a_likelihood_bce_greylevels"
    assert scoring.data.tags["model.uri"] == uri
    assert not [m for m in scoring.data.metrics if "nll" in m]


@pytest.mark.parametrize(
    "likelihood, variant, likelihood_names",
    [
        ("bernoulli", "binarized", True),
        ("continuous_bernoulli", "continuous", True),  # a density of its own
        ("continuous_bernoulli", "binarized", True),
        ("bernoulli", "continuous", False),  # a summed BCE on grey levels
    ],
)
def test_only_a_likelihood_gets_likelihood_names(likelihood, variant, likelihood_names) -> None:
    kind, columns = score_columns(likelihood, variant)
    assert (columns == ScoreColumns()) is likelihood_names, kind
    assert ("nll" in columns.reconstruction) is likelihood_names
