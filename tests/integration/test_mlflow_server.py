"""The pipeline against a real `mlflow server` over HTTP: the run, its (proxied) artifacts
and the registered version go there, the model loads back from it, and nothing is written to
the workspace's own SQLite store."""

import json
import shutil
import urllib.parse
import urllib.request
from types import SimpleNamespace

import mlflow
import pytest
import torch

from flows.cli import main as cli_main
from flows.lineage import data_lineage
from flows.model_io import load_vae
from flows.pipeline import training_pipeline

MODEL = "mnist-vae"

# A server start plus a tiny pipeline run on a copy of the prepared workspace.
pytestmark = pytest.mark.slow


def rest(server: SimpleNamespace, endpoint: str, **query: str) -> dict:
    """GET an MLflow REST endpoint and decode its JSON."""
    url = f"{server.url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as resp:
        assert resp.status == 200
        return json.loads(resp.read())


def test_pipeline_tracks_and_registers_over_http(
    mlflow_server, prefect_harness, isolated_mlflow_uri, pipeline_workspace, monkeypatch, tmp_path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    ws = pipeline_workspace("pipeline-http")  # the prepared data: nothing for `dvc repro` to do
    (ws / "mlflow.db").unlink()  # its empty local store: nothing may create one again
    shutil.rmtree(ws / "mlruns", ignore_errors=True)
    overrides = ["evaluate.iwae_k=3"]  # params.yaml holds the tiny settings; one to see logged
    state = training_pipeline(overrides=overrides, workdir=str(ws), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    run_id = result["run_id"]
    assert result["model"] == {"name": MODEL, "version": "1"}
    assert result["gate"]["decision"] == "promote"
    assert not (ws / "mlflow.db").exists(), "the run went to the local store, not the server"
    local_artifacts = ws / "mlruns"
    assert not local_artifacts.exists() or not any(local_artifacts.iterdir())  # all on the server

    # The run and its lineage, read back through the server's REST API.
    run = rest(mlflow_server, "runs/get", run_id=run_id)["run"]
    assert run["info"]["status"] == "FINISHED"
    assert run["info"]["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied
    tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
    lineage = data_lineage(ws)
    assert tags["dvc.raw_md5"] == lineage["raw_md5"]
    assert tags["dvc.processed_md5"] == lineage["processed_md5"]
    assert tags["prefect.flow_run_id"] == str(state.state_details.flow_run_id)
    assert tags["gate.decision"] == "promote"
    assert len(tags["git.commit"]) == 40
    params = {p["key"]: p["value"] for p in run["data"]["params"]}
    assert params["train.epochs"] == "1" and params["evaluate.iwae_k"] == "3"
    metric_keys = {m["key"] for m in run["data"]["metrics"]}
    assert {"train/neg_elbo", "val/neg_elbo", "test/neg_elbo", "test/nll_iwae"} <= metric_keys
    inputs = run["inputs"]["dataset_inputs"]
    digests = {i["dataset"]["name"]: i["dataset"]["digest"] for i in inputs}
    assert digests["mnist-processed"] == lineage["processed_md5"]
    assert {"mnist-test", "mnist-holdout"} <= set(digests)  # the evaluation's inputs

    images = rest(mlflow_server, "artifacts/list", run_id=run_id, path="images")
    assert any(f["path"].startswith("images/samples+step+1+") for f in images["files"])
    evaluation = rest(mlflow_server, "artifacts/list", run_id=run_id, path="evaluation")
    assert "evaluation/samples.png" in {f["path"] for f in evaluation["files"]}
    # The server stored the artifacts in its own destination folder.
    stored = mlflow_server.root / "artifacts"
    assert any(stored.rglob("samples.png"))
    assert any(stored.rglob("model.safetensors"))

    registered = rest(mlflow_server, "registered-models/get", name=MODEL)["registered_model"]
    aliases = {a["alias"]: a["version"] for a in registered["aliases"]}
    assert aliases == {"champion": "1", "challenger": "1"}
    version = rest(mlflow_server, "model-versions/get", name=MODEL, version="1")["model_version"]
    assert version["run_id"] == run_id
    version_tags = {t["key"]: t["value"] for t in version["tags"]}
    assert version_tags["dvc.processed_md5"] == lineage["processed_md5"]
    assert version_tags["gate.decision"] == "promote"
    assert version_tags["prefect.flow_run_id"] == tags["prefect.flow_run_id"]

    # The champion loads over HTTP (artifacts proxied by the server) and samples.
    mlflow.set_tracking_uri(mlflow_server.url)
    model = load_vae(f"models:/{MODEL}@champion")
    images = model.sample(4, torch.Generator().manual_seed(0))
    assert tuple(images.shape) == (4, 1, 28, 28) and torch.isfinite(images).all()
    out = tmp_path / "http-samples.png"
    argv = ["sample", "--model", f"models:/{MODEL}@champion", "-n", "4", "--out", str(out)]
    assert cli_main([*argv, "--workdir", str(ws)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert mlflow_server.proc.alive()
