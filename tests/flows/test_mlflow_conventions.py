"""MLflow 3 conventions, against a real SQLite backend: the evaluation's figures are metrics of
the logged model, each linked to the split it was measured on; the test and holdout splits are
the run's evaluation inputs; logging warns about nothing. Also what a run logs as metrics
(flows/run_record.py), and that every number a real evaluation returns has a name, so
run_record's table cannot fall behind evaluate_model."""

import json
import warnings
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from helpers import random_splits

from flows import run_record, tracking, workspace
from flows.events import decision_event
from flows.model_io import log_vae
from flows.params import SECTIONS, Params
from flows.pipeline import evaluate
from flows.registry import register_version
from vae_core import figure_names
from vae_core.config import EvalConfig, TrainConfig
from vae_core.data import DatasetSplits, save_processed
from vae_core.evaluation import MnistClassifier, evaluate_model
from vae_core.evaluation.classifier import save_classifier
from vae_core.models import build_vae
from vae_core.training import save_model

DATASET = "mnist"
EVAL = {"iwae_k": 4, "iwae_test_size": 12, "num_samples": 24, "seed": 1}


def _splits() -> DatasetSplits:
    return random_splits({"train": 40, "val": 10, "holdout": 10, "test": 30})


def _vae(likelihood: str = "bernoulli") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_vae({"hidden_sizes": [16], "latent_dim": 2, "likelihood": likelihood}).eval()


SECTIONS_OF_FIGURES = {"test", "holdout", "sample_quality", "time"}


def test_a_real_evaluation_has_a_name_for_every_number(tmp_path: Path) -> None:
    """Continuous pixels, no classifier (not a likelihood, no sample quality); the binarized
    evaluation with a classifier is named in the pipeline's evaluate task below."""
    metrics = evaluate_model(_vae(), _splits(), "continuous", tmp_path, EvalConfig(**EVAL))
    figures = run_record.evaluation_figures(metrics)  # an unnamed number would raise here
    assert {"test/neg_elbo", "test/active_units", "time/eval_seconds"} <= set(figures)
    assert {name.split("/")[0] for name in figures} <= SECTIONS_OF_FIGURES


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory):
    """A workspace with processed data and a classifier, and a real SQLite store."""
    root, previous_uri = tmp_path_factory.mktemp("ws"), mlflow.get_tracking_uri()
    indices = {s: np.arange(n) for s, n in (("train", 40), ("val", 10), ("holdout", 10))}
    save_processed(_splits(), indices, workspace.processed_dir(root, DATASET))
    classifier_dir = workspace.classifier_dir(root, DATASET)
    classifier_dir.mkdir(parents=True)
    torch.manual_seed(0)
    save_classifier(MnistClassifier().eval(), classifier_dir, {})
    client = tracking.connect(f"sqlite:///{root / 'mlflow.db'}")
    experiment_id = tracking.ensure_experiment(client, DATASET, root)
    yield {"root": root, "client": client, "experiment_id": experiment_id}
    mlflow.set_tracking_uri(previous_uri)


def test_evaluation_figures_are_the_logged_models_metrics_on_their_splits(store) -> None:
    """A run logs its training data and a tiny VAE (log_vae), warning about nothing; the
    pipeline's evaluate task (as a plain function) scores the model into that run."""
    client, root, experiment_ids = store["client"], store["root"], [store["experiment_id"]]
    model, model_dir = _vae(), root / "saved-model"
    save_model(model, model.config.to_dict() | {"data_variant": "binarized"}, model_dir)
    lineage = {"processed_md5": "0123456789abcdef0123456789abcdef.dir"}
    processed = workspace.processed_dir(root, DATASET)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with tracking.run_scope(client, experiment_ids[0], run_name="conventions") as scope:
            tracking.log_dataset(client, scope.run_id, lineage, processed, DATASET)
            with tracking.active_run(scope.run_id):
                info = log_vae(model, "binarized")
    logged = [str(w.message) for w in caught]
    assert not [w for w in logged if "interpreted in multiple ways" in w]  # dataset source
    assert not [w for w in logged if "type hint" in w.lower()]  # the served model's predict

    run_id, uri = scope.run_id, client.tracking_uri
    params = Params(**{name: cls() for name, cls in SECTIONS.items()})
    params = params.replace({f"evaluate.{k}": v for k, v in EVAL.items()})
    ev = evaluate.fn(str(root), params, run_id, uri, str(model_dir), info.model_id)
    version = register_version(run_id, "conventions-vae", "model", {}, "", info.model_uri)
    assert client.get_model_version(version.name, version.version).source == info.model_uri

    (found,) = mlflow.search_logged_models(experiment_ids=experiment_ids, output_format="list")
    assert found.model_id == info.model_id
    registered = json.loads(found.tags["mlflow.modelVersions"])
    assert registered == [{"name": version.name, "version": int(version.version)}]
    on = {m.key: m.dataset_name for m in found.metrics}
    assert set(on) == set(ev["figures"])  # every evaluation figure, on the model
    assert "test/active_units" in on and {n.split("/")[0] for n in on} <= SECTIONS_OF_FIGURES
    for name in ("test/nll_iwae", "test/neg_elbo", "sample_quality/fd", "sample_quality/ref_fd"):
        assert on[name] == "mnist-test", name
    assert (on["holdout/nll_iwae"], on["time/eval_seconds"]) == ("mnist-holdout", None)
    # what a user types to find the models that did well on the gate's data
    best = mlflow.search_logged_models(
        experiment_ids=experiment_ids,
        filter_string="metrics.`holdout/nll_iwae` < 1e9",
        datasets=[{"dataset_name": "mnist-holdout"}],
        output_format="list",
    )
    assert [m.model_id for m in best] == [info.model_id]

    # the processed data (named by its DVC md5) trained it; the test and holdout splits scored it
    inputs = client.get_run(run_id).inputs.dataset_inputs
    contexts = {
        i.dataset.name: {t.key: t.value for t in i.tags}["mlflow.data.context"] for i in inputs
    }
    evaluation = dict.fromkeys(("mnist-test", "mnist-holdout"), "evaluation")
    assert contexts == {"mnist-processed": "training", **evaluation}
    datasets = {i.dataset.name: i.dataset for i in inputs}
    assert datasets["mnist-processed"].digest == lineage["processed_md5"]
    assert str(processed) in datasets["mnist-processed"].source
    test_digest = datasets["mnist-test"].digest
    assert test_digest != datasets["mnist-holdout"].digest
    assert test_digest == tracking.split_dataset(processed, DATASET, "test").digest
    assert {m.key: m for m in found.metrics}["test/nll_iwae"].dataset_digest == test_digest
    assert {i.dataset.source_type for i in inputs} == {"local"}


def test_run_scope_gives_every_run_its_end_status(store) -> None:
    client, experiment_id = store["client"], store["experiment_id"]

    def status(run_id: str) -> str:
        return client.get_run(run_id).info.status

    with tracking.run_scope(client, experiment_id, run_name="ok", tags={"a": "1"}) as ok:
        assert status(ok.run_id) == "RUNNING"
    run = client.get_run(ok.run_id)
    assert (run.info.status, run.info.run_name, run.data.tags["a"]) == ("FINISHED", "ok", "1")
    assert run.info.end_time is not None

    with pytest.raises(ValueError, match="boom"), tracking.run_scope(client, experiment_id) as f:
        client.create_registered_model("scope-vae")
        client.create_model_version("scope-vae", "file:///nowhere", run_id=f.run_id)
        raise ValueError("boom")
    assert status(f.run_id) == "FAILED"
    assert client.get_run(f.run_id).data.tags["failure.reason"] == "ValueError: boom"
    assert client.search_model_versions(f"run_id='{f.run_id}'") == []  # deleted again

    # A run that fails after the gate made its version champion keeps that version.
    with pytest.raises(ValueError), tracking.run_scope(client, experiment_id) as late:
        v = client.create_model_version("scope-vae", "file:///nowhere", run_id=late.run_id)
        client.set_registered_model_alias("scope-vae", "champion", v.version)
        raise ValueError("after the gate")
    assert client.get_model_version_by_alias("scope-vae", "champion").version == v.version
    assert "kept: it holds champion" in client.get_run(late.run_id).data.tags["failure.reason"]

    resumable = lambda exc: isinstance(exc, ConnectionError)  # noqa: E731 - a server's hiccup
    scope = tracking.run_scope(client, experiment_id, interrupted=resumable)
    with pytest.raises(ConnectionError), scope as killed:
        raise ConnectionError("server away")
    tags = client.get_run(killed.run_id).data.tags
    assert status(killed.run_id) == "KILLED" and "failure.reason" not in tags
    assert tags["interrupted.reason"] == "ConnectionError: server away"

    # handed on (a sweep's child run), reopened by the task that runs it, decided inside
    with tracking.run_scope(client, experiment_id, end_status="SCHEDULED") as child:
        pass
    assert status(child.run_id) == "SCHEDULED"
    with tracking.run_scope(client, run_id=child.run_id, tags={"attempt": "2"}) as reopened:
        assert status(child.run_id) == "RUNNING"
        reopened.end_status = "FAILED"
    assert status(child.run_id) == "FAILED"
    assert client.get_run(child.run_id).data.tags["attempt"] == "2"


EPOCH = {"epoch": 3, "beta": 0.5, "lr": 0.001, "train_loss": 101.0, "train_neg_elbo": 100.0}
EPOCH |= {"val_neg_elbo": 110.0, "val_recon": 80.0, "val_kl": 30.0, "epoch_seconds": 2.0}
EPOCH |= {"samples_per_second": 2000.0}


@pytest.mark.parametrize(
    "overrides, logged, not_logged",
    [
        ({}, {"schedule/lr"}, {"train/loss", "schedule/kl_weight"}),
        ({"lr_schedule": "constant"}, set(), {"schedule/lr", "schedule/kl_weight"}),
        ({"warmup_epochs": 5}, {"schedule/kl_weight", "train/loss"}, set()),
        ({"objective": "iwae", "iwae_k": 5}, {"train/loss"}, {"schedule/kl_weight"}),
    ],
    ids=["defaults", "constant-lr", "kl-warm-up", "iwae-objective"],
)
def test_each_epoch_logs_what_changes_and_nothing_twice(overrides, logged, not_logged) -> None:
    skip = figure_names.repeated_epoch_keys(TrainConfig(**overrides))
    figures = figure_names.epoch_figures(EPOCH, skip)
    assert {"train/neg_elbo", "val/neg_elbo", "val/recon", "val/kl"} <= set(figures)
    assert logged <= set(figures) and not (not_logged & set(figures))
    assert "epoch" not in figures and figures["val/neg_elbo"] == 110.0


def test_evaluation_keeps_figures_drops_settings_counts_and_labels_and_names_no_name() -> None:
    figures = {"test_nll_iwae": 90.0, "active_units": 17, "sq_fd": 12.0, "sq_ref_fd": 3.0}
    figures |= {"holdout_nll_iwae": 91.0, "eval_seconds": 4.0}
    dropped = {"test_nll_iwae_estimator": "IWAE bound with k=100", "iwae_k": 100, "seed": 0}
    dropped |= {"latent_dim": 20, "active_units_threshold": 0.01, "sq_kid_subset_size": 500}
    dropped |= {"sq_label_frac_3": 0.1, "sq_ref_label_frac_3": 0.1, "holdout_num_examples": 500}
    dropped |= {"data_variant": "binarized"}
    named = {"test/nll_iwae": 90.0, "test/active_units": 17.0, "sample_quality/fd": 12.0}
    named |= {"sample_quality/ref_fd": 3.0, "holdout/nll_iwae": 91.0, "time/eval_seconds": 4.0}
    assert run_record.evaluation_figures(figures | dropped) == named
    # A figure without a name is an error naming it.
    metrics = {"test_nll_iwae": 90.0, "iwae_k": 100, "sq_sharpness": 0.7}
    with pytest.raises(run_record.UnnamedFigureError, match="'sq_sharpness' = 0.7"):
        run_record.evaluation_figures(metrics)
    del metrics["sq_sharpness"]
    assert run_record.evaluation_figures(metrics) == {"test/nll_iwae": 90.0}


def test_every_figure_knows_the_split_it_was_measured_on() -> None:
    on = {n: run_record.evaluated_on(n) for n in run_record.EVAL_FIGURES.values()}
    assert set(on.values()) == {"test", "holdout", None}
    assert {n for n, s in on.items() if s is None} == {n for n in on if n.startswith("time/")}
    assert run_record.on_test_set("sample_quality/fd") and run_record.on_test_set("test/kl")
    assert not run_record.on_test_set("holdout/nll_iwae")
    assert not run_record.on_test_set("val/best_neg_elbo")


@pytest.mark.parametrize("by_iwae", [False, True], ids=["elbo-objective", "iwae-objective"])
def test_the_description_names_the_figure_that_chose_the_weights(by_iwae) -> None:
    train = {"best_epoch": 7, "epochs": 9, "best_val_neg_elbo": 95.0}
    if by_iwae:
        train["best_val_neg_iwae"] = 93.0
    figures = figure_names.training_figures(train)
    assert ("val/best_neg_iwae" in figures) == by_iwae
    text = run_record.description(train, {"data_variant": "binarized"}, figures)
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    chooser = "val/best_neg_iwae" if by_iwae else "val/best_neg_elbo"
    assert "chooses the weights" in rows[chooser] and "epoch (7 of 9)" in rows[chooser]
    assert [name for name, row in rows.items() if "chooses the weights" in row] == [chooser]


@pytest.mark.parametrize(
    "gate, event",
    [
        ({"decision": "promote", "applied": True, "mode": "enabled"}, "vae.model.promoted"),
        ({"decision": "reject", "applied": False, "mode": "enabled"}, "vae.model.rejected"),
        ({"decision": "reject", "applied": False, "mode": "dry-run"}, "vae.model.gated"),
        ({"decision": "promote", "applied": False, "mode": "dry-run"}, "vae.model.gated"),
        ({"decision": "promote", "applied": False, "mode": "enabled"}, "vae.model.gated"),  # stale
        ({"decision": "not-evaluated", "applied": False, "mode": "disabled"}, "vae.model.gated"),
    ],
)
def test_only_a_gate_that_acted_promotes_or_rejects(gate: dict, event: str) -> None:
    assert decision_event(gate) == event
