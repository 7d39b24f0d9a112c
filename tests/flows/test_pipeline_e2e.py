"""The `training-pipeline` flow end to end, with no mocks: a real Prefect API (the session's
test harness), a real MLflow SQLite store in a throw-away git + DVC workspace, the real `dvc`
CLI for the data stages, and the `vae-pipeline` commands people use.

The scenario (run once for the module, whole, before any test looks at it): run 1 trains two
epochs and, as the first version meeting the floor, becomes champion; run 2 trains zero epochs
(an untrained model, ~545 nats against ~210), is registered as challenger and rejected by the
gate. Then a person promotes version 2 by hand and rolls back. Each test reads one aspect back
from MLflow, DVC, git or Prefect (or from what the scenario recorded at a step), and changes
nothing, so the tests pass in any order.
"""

from __future__ import annotations

import contextlib
import io
import math
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.cli import main as cli_main
from flows.lineage import data_lineage, model_code_hash
from flows.params import load_params
from flows.pipeline import training_pipeline

MODEL = "mnist-vae"
EXPERIMENT = "vae-mnist"


def with_epochs(overrides: list[str], epochs: int) -> list[str]:
    return [o for o in overrides if not o.startswith("train.epochs=")] + [f"train.epochs={epochs}"]


def run_pipeline(workdir: Path, overrides: list[str], force: bool = False) -> SimpleNamespace:
    start = time.monotonic()
    state = training_pipeline(
        overrides=overrides, workdir=str(workdir), force=force, return_state=True
    )
    seconds = time.monotonic() - start
    assert state.is_completed(), f"flow run ended {state.type}: {state.message}"
    result = state.result()
    return SimpleNamespace(
        overrides=overrides,
        state=state,
        flow_run_id=state.state_details.flow_run_id,
        result=result,
        run_id=result["run_id"],
        seconds=seconds,
    )


@pytest.fixture(scope="module")
def scenario(prefect_harness, isolated_mlflow_uri, workspace_factory, tiny_overrides):
    from mlflow import MlflowClient

    ws = workspace_factory("pipeline-e2e")
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ws, capture_output=True, text=True, check=True
    ).stdout.strip()
    run1 = run_pipeline(ws, with_epochs(tiny_overrides, 2))
    lock_after_run1 = (ws / "dvc.lock").read_text()
    run2 = run_pipeline(ws, with_epochs(tiny_overrides, 0))
    code_hash = model_code_hash()  # what run 3 compares with: the code as the runs saw it
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    aliases = dict(client.get_registered_model(MODEL).aliases)
    # Nothing changed since run 2: no training, no version; then the same with --force.
    run3 = run_pipeline(ws, run2.overrides)
    after_skip = {
        "aliases": dict(client.get_registered_model(MODEL).aliases),
        "versions": sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'")),
        "runs": len(client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])),
    }
    run4 = run_pipeline(ws, run2.overrides, force=True)
    manual = manual_moves(ws, client)
    print(
        f"\nworkspace {ws}\nrun 1: {run1.seconds:.0f} s, run 2: {run2.seconds:.0f} s; "
        f"aliases after two runs: {aliases}"
    )
    return SimpleNamespace(
        ws=ws,
        head=head,
        run1=run1,
        run2=run2,
        run3=run3,
        run4=run4,
        after_skip=after_skip,
        client=client,
        aliases_after_runs=aliases,
        lock_after_run1=lock_after_run1,
        manual=manual,
        code_hash=code_hash,
    )


def version_tags(scenario, version: str) -> dict[str, str]:
    return dict(scenario.client.get_model_version(MODEL, version).tags)


def aliases(scenario) -> dict[str, str]:
    return {k: str(v) for k, v in scenario.client.get_registered_model(MODEL).aliases.items()}


PROMOTE_REASON = "manual check: promote the untrained version 2"
ROLLBACK_REASON = "roll back: version 2 was never trained"


def manual_moves(ws: Path, client) -> dict[str, SimpleNamespace]:
    """What a person does after the runs: promote version 2 by hand, try again (refused),
    roll back. Each step's exit status, output, aliases, version tags and descriptions."""
    common = ["--workdir", str(ws), "--actor", "pytest"]

    def step(*argv: str) -> SimpleNamespace:
        out, err = io.StringIO(), io.StringIO()  # never closed: see test_pipeline_faults
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main([*argv, *common])
        versions = {v: client.get_model_version(MODEL, v) for v in ("1", "2")}
        return SimpleNamespace(
            rc=rc,
            out=out.getvalue(),
            err=err.getvalue(),
            aliases={k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()},
            tags={v: dict(mv.tags) for v, mv in versions.items()},
            descriptions={v: mv.description or "" for v, mv in versions.items()},
        )

    return {
        "promote": step("promote", "2", "--reason", PROMOTE_REASON),
        "again": step("promote", "2", "--reason", "again"),
        "rollback": step("rollback", "--reason", ROLLBACK_REASON),
    }


# --------------------------------------------------------------------------- registry + gate


def test_first_run_registers_version_1_as_champion(scenario) -> None:
    result = scenario.run1.result
    assert result["model"] == {"name": MODEL, "version": "1"}
    gate = result["gate"]
    assert gate["decision"] == "promote" and gate["applied"] is True
    assert gate["champion_before"] is None
    assert gate["reason"].startswith("no champion yet") and "floor 1000" in gate["reason"]
    assert gate["figures"]["challenger_mean_nll"] <= 1000

    mv = scenario.client.get_model_version(MODEL, "1")
    assert mv.run_id == scenario.run1.run_id
    tags = dict(mv.tags)
    assert tags["gate.decision"] == "promote"
    assert tags["gate.applied"] == "true"
    assert tags["gate.mode"] == "enabled"
    assert tags["gate.reason"] == gate["reason"]
    assert tags["mlflow.run_id"] == scenario.run1.run_id
    assert "now champion" in mv.description
    run = scenario.client.get_run(scenario.run1.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gate.decision"] == "promote"


def test_worse_second_run_is_registered_but_not_promoted(scenario) -> None:
    result = scenario.run2.result
    assert result["model"] == {"name": MODEL, "version": "2"}
    gate = result["gate"]
    assert gate["decision"] == "reject" and gate["applied"] is False
    assert gate["champion_before"] == "1"
    assert gate["reason"].startswith("not promoted: ")
    assert "improvement not significant" in gate["reason"]
    figures = gate["figures"]
    assert figures["challenger_mean_nll"] > figures["champion_mean_nll"] + 100  # untrained
    assert figures["mean_improvement"] < 0 and figures["ci_high"] < 0
    # The gate decided on the holdout, not the test set, and reused each run's own
    # evaluation: the same examples, the same figures, no second IWAE pass for the challenger.
    # The champion's side is run 1's holdout NLL, computed again from the registered model.
    metrics, run1_metrics = result["metrics"], scenario.run1.result["metrics"]
    assert figures["n"] == metrics["holdout_num_examples"] == 500
    assert figures["challenger_mean_nll"] == pytest.approx(metrics["holdout_nll_iwae"])
    assert figures["champion_mean_nll"] == pytest.approx(run1_metrics["holdout_nll_iwae"], rel=1e-5)
    assert figures["challenger_mean_nll"] != pytest.approx(metrics["test_nll_iwae"])

    # Registered, challenger, and champion did not move.
    assert scenario.aliases_after_runs == {"champion": 1, "challenger": 2}
    mv = scenario.client.get_model_version(MODEL, "2")
    assert mv.run_id == scenario.run2.run_id
    tags = dict(mv.tags)
    assert tags["gate.decision"] == "reject"
    assert tags["gate.applied"] == "false"
    assert tags["gate.reason"] == gate["reason"]
    assert float(tags["gate.champion_mean_nll"]) == pytest.approx(figures["champion_mean_nll"])
    assert float(tags["gate.mean_improvement"]) == pytest.approx(figures["mean_improvement"])
    assert "gate.previous_champion" not in tags
    assert "not promoted" in mv.description and gate["reason"] in mv.description
    run = scenario.client.get_run(scenario.run2.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["gate.decision"] == "reject"
    assert run.data.params["train.epochs"] == "0"


def test_nothing_changed_trains_nothing_until_forced(scenario) -> None:
    run2, run3, run4 = scenario.run2, scenario.run3, scenario.run4
    gate = run3.result["gate"]
    assert gate["decision"] == "up-to-date" and gate["applied"] is False
    assert run3.result["model"] == {"name": MODEL, "version": "2"}
    assert run3.result["run_id"] is None
    assert "up to date: mnist-vae v2" in gate["reason"] and "--force" in gate["reason"]
    # Registered nothing, moved nothing, started no MLflow run.
    assert scenario.after_skip["versions"] == [1, 2]
    assert scenario.after_skip["aliases"] == scenario.aliases_after_runs
    assert scenario.after_skip["runs"] == 2
    # The version says what it was made from; the skipped run matched exactly that.
    made_from = version_tags(scenario, "2")
    assert {k: made_from[k] for k in ("dvc.processed_md5", "params.hash", "code.hash")} == {
        "dvc.processed_md5": data_lineage(scenario.ws)["processed_md5"],
        "params.hash": load_params(scenario.ws / "params.yaml", run2.overrides).hash(),
        "code.hash": scenario.code_hash,
    }
    # --force trains and registers anyway (the same figures: training is deterministic).
    assert run4.result["model"] == {"name": MODEL, "version": "3"}
    assert run4.result["gate"]["decision"] == "reject"
    assert run4.result["metrics"]["test_nll_iwae"] == pytest.approx(
        run2.result["metrics"]["test_nll_iwae"]
    )


def test_the_summary_artifact_and_events_name_each_decision(scenario) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[scenario.run3.flow_run_id])
            )
        )
        (summary,) = [a for a in artifacts if a.key == "training-pipeline-summary"]
        assert "up to date: mnist-vae v2" in summary.data

        # Events reach the API through a background client: wait for them, not for a clock.
        wanted = {
            ("vae.model.promoted", "1"),
            ("vae.model.rejected", "2"),
            ("vae.model.up-to-date", "2"),
            ("vae.model.rejected", "3"),
        }
        # Only this scenario's flow runs: other modules run pipelines against the same Prefect
        # API and emit the same event names for their own versions 1, 2, ...
        runs = (scenario.run1, scenario.run2, scenario.run3, scenario.run4)
        event_filter = EventFilter(
            event=EventNameFilter(prefix=["vae.model."]),
            related=EventRelatedFilter(id=[f"prefect.flow-run.{r.flow_run_id}" for r in runs]),
        )
        deadline = time.monotonic() + 120
        while True:
            page = client.read_events(filter=event_filter, limit=50)
            seen = {(e.event, e.resource["mlflow.version"]) for e in page.events}
            if wanted <= seen or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert wanted <= seen, seen
        (event,) = [e for e in page.events if e.event == "vae.model.up-to-date"]
        assert event.resource.id == "mlflow.model-version.mnist-vae.2"
        assert event.payload["params.hash"] and event.payload["code.hash"]


# --------------------------------------------------------------------------- lineage


def test_lineage_tags_match_dvc_lock_and_git(scenario) -> None:
    ws = scenario.ws
    lineage = data_lineage(ws)
    assert lineage["params_match_lock"] is True
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    assert lineage["raw_md5"] == lock["fetch"]["outs"][0]["md5"]
    assert lineage["processed_md5"] == lock["prepare"]["outs"][0]["md5"]
    # Run 2 changed no data parameter: DVC had nothing to redo and the lock is unchanged.
    assert (ws / "dvc.lock").read_text() == scenario.lock_after_run1

    for run, version in ((scenario.run1, "1"), (scenario.run2, "2")):
        tags = scenario.client.get_run(run.run_id).data.tags
        params = load_params(ws / "params.yaml", run.overrides)
        expected = {
            "dvc.raw_md5": lineage["raw_md5"],
            "dvc.processed_md5": lineage["processed_md5"],
            "git.commit": scenario.head,
            # The overrides are written into params.yaml (like `dvc exp run -S`): dirty tree.
            "git.dirty": "true",
            "params.hash": params.hash(),
            "data.dataset": "mnist",
            "data.source": "embedded",
            "device": "cpu",
            "prefect.flow_run_id": str(run.flow_run_id),
        }
        assert {k: tags.get(k) for k in expected} == expected
        assert tags["torch.version"] and tags["python.version"]
        assert "prefect.deployment" not in tags  # not scheduled: a plain flow call
        # The registered version carries the same lineage, so the registry page alone says
        # which data, code, parameters and flow run made it.
        mv_tags = version_tags(scenario, version)
        assert {k: mv_tags.get(k) for k in expected} == expected
        assert mv_tags["prefect.flow_run_name"] == tags["prefect.flow_run_name"]
    assert (
        scenario.client.get_run(scenario.run1.run_id).data.tags["params.hash"]
        != scenario.client.get_run(scenario.run2.run_id).data.tags["params.hash"]
    )


def test_dataset_input_digest_is_the_dvc_md5(scenario) -> None:
    lineage = data_lineage(scenario.ws)
    for run in (scenario.run1, scenario.run2):
        inputs = scenario.client.get_run(run.run_id).inputs.dataset_inputs
        assert len(inputs) == 1
        ds = inputs[0].dataset
        assert ds.digest == lineage["processed_md5"]
        assert ds.name == "mnist-processed"
        assert str(scenario.ws / "data" / "processed" / "mnist") in ds.source
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] == "training"


# --------------------------------------------------------------------------- what is logged


def test_params_metrics_and_artifacts_are_logged(scenario) -> None:
    client, run1 = scenario.client, scenario.run1
    run = client.get_run(run1.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.artifact_location == (scenario.ws / "mlruns").resolve().as_uri()
    assert client.get_run(scenario.run2.run_id).info.experiment_id == experiment.experiment_id

    # Every parameter (params.yaml flattened with the run's overrides applied), once; the
    # overrides as given are a tag.
    expected_params = load_params(scenario.ws / "params.yaml", run1.overrides).flat()
    assert run.data.params == expected_params
    assert run.data.tags["params.overrides"] == " ".join(run1.overrides)
    assert run.data.params["train.epochs"] == "2"

    # Per-epoch training curves, with the epoch as the step.
    for key in ("train/neg_elbo", "val/neg_elbo", "val/kl", "schedule/lr"):
        history = client.get_metric_history(run1.run_id, key)
        assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2], key
        assert all(math.isfinite(m.value) for m in history)
    # Final figures, each once, under the sections the MLflow charts group by.
    metrics = run.data.metrics
    for key in ("test/neg_elbo", "test/nll_iwae", "val/best_neg_elbo", "train/best_epoch"):
        assert math.isfinite(metrics[key]), key
    assert 50 < metrics["test/nll_iwae"] < 1000
    # The flow's result (what `vae-pipeline run` prints) carries the headline figures.
    assert run1.result["figures"] == {
        k: metrics[k]
        for k in ("test/nll_iwae", "test/neg_elbo", "val/best_neg_elbo", "holdout/nll_iwae")
    }
    mv_tags = version_tags(scenario, "1")
    assert mv_tags["metric.test/nll_iwae"] == f"{metrics['test/nll_iwae']:.4f}"
    artifacts = {a.path for a in client.list_artifacts(run1.run_id)}
    assert {"images", "evaluation", "loss_curve.png"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(run1.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/samples.png"} <= evaluation
    # The artifacts are files under the workspace's mlruns/ (the local artifact root).
    assert run.info.artifact_uri.startswith((scenario.ws / "mlruns").resolve().as_uri() + "/")
    on_disk = Path(run.info.artifact_uri.removeprefix("file://"))
    assert (on_disk / "evaluation" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


SECTIONS = ("train/", "val/", "test/", "holdout/", "sample_quality/", "schedule/", "time/")


def test_settings_are_params_and_figures_are_metrics_once(scenario) -> None:
    """The metric keys of a run of the main job: every one a figure in a section, none a
    setting, no figure twice (the issue found `iwae_k`, `beta`, `seed` ... among the metrics
    and two test -ELBOs)."""
    client = scenario.client
    run = client.get_run(scenario.run1.run_id)
    keys = {k for k in run.data.metrics if not k.startswith("system/")}
    assert keys and all(k.startswith(SECTIONS) for k in keys), sorted(keys)
    # schedule/lr is a curve (the exponential schedule's rate each epoch, step = epoch), not
    # the setting train.lr it starts from; a constant KL weight (no warm-up) is not logged.
    leaves = {k.split("/", 1)[1] for k in keys if not k.startswith("schedule/")}
    assert "schedule/lr" in keys and "schedule/kl_weight" not in keys
    settings = {k.rsplit(".", 1)[-1] for k in run.data.params}  # train.lr -> lr, ...
    settings |= {"iwae_k", "iwae_test_size", "iwae_num_examples", "active_units_threshold"}
    settings |= {"latent_dim", "kid_subset_size", "kid_subsets", "num_samples", "test_size"}
    assert not leaves & (settings - {"epochs"}), sorted(leaves & settings)
    assert "train/epochs" in keys  # the epochs run (early stopping), not the setting
    assert [k for k in keys if "neg_elbo" in k and k.startswith("test/")] == ["test/neg_elbo"]
    assert "train/loss" not in keys  # the ELBO objective: the loss *is* train/neg_elbo
    assert not [k for k in keys if "label_frac" in k]


def test_experiment_kind_and_run_description(scenario) -> None:
    """The experiment opens on its training runs; the run says what every figure is."""
    client = scenario.client
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    run = client.get_run(scenario.run1.run_id)
    note = run.data.tags["mlflow.note.content"]
    nll = run.data.metrics["test/nll_iwae"]
    assert f"| `test/nll_iwae` | {nll:.4g} | IWAE bound with k=5 " in note
    assert "binarized" in note and "| `test/neg_elbo` |" in note
    # The prose that used to be tags lives there now, not as tags.
    assert not [k for k in run.data.tags if k.endswith("_estimator") or k.startswith("png_")]
    version = client.get_model_version(MODEL, "1")
    assert scenario.run1.run_id in version.description
    assert f"| `test/nll_iwae` | {nll:.2f} |" in version.description


def _image_steps(client, run_id: str) -> dict[str, set[int]]:
    """key -> steps of the images logged with MlflowClient.log_image(key=, step=)."""
    steps: dict[str, set[int]] = {}
    for artifact in client.list_artifacts(run_id, "images"):
        name = Path(artifact.path).name
        if name.endswith(".png"):
            key, _, step, *_ = name.removesuffix(".png").split("+")
            steps.setdefault(key, set()).add(int(step))
    return steps


def test_training_images_are_logged_with_steps(scenario) -> None:
    """Samples of fixed z and reconstructions of fixed validation images, every few epochs
    (every epoch of this two-epoch run), from the initial weights at step 0 (where MLflow's
    image cards open) on, so the UI shows how they improve."""
    steps = _image_steps(scenario.client, scenario.run1.run_id)
    assert steps == {"samples": {0, 1, 2}, "reconstructions": {0, 1, 2}}
    # The untrained run 2 (zero epochs) shows its one model, at step 0.
    assert _image_steps(scenario.client, scenario.run2.run_id) == {
        "samples": {0},
        "reconstructions": {0},
    }


def test_the_registered_model_is_the_served_vae_logged_as_code(scenario) -> None:
    """The version's model: this project's served-model code plus safetensors weights and
    config, no pickle; it answers every method in-process as it would over HTTP."""
    import mlflow
    import numpy as np
    from mlflow.models import Model

    client = scenario.client
    mv = client.get_model_version(MODEL, "1")
    assert mv.source.startswith("models:/")
    local = Path(mlflow.artifacts.download_artifacts(mv.source, tracking_uri=client.tracking_uri))
    model = Model.load(str(local))
    assert model.metadata["vae_weights_format"] == "safetensors"
    assert model.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert (local / "artifacts" / "model.safetensors").is_file()
    assert (local / "artifacts" / "model_config.json").is_file()
    assert not list(local.rglob("*.pkl")) and not list(local.rglob("*.pth"))
    assert [p.name for p in model.signature.params.params] == ["method", "n", "k", "seed"]
    served = mlflow.pyfunc.load_model(str(local))
    images = served.predict(
        np.zeros((1, 1, 28, 28), np.float32), params={"method": "sample", "n": 3}
    )
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() <= images.max() <= 1


# --------------------------------------------------------------------------- Prefect


def test_prefect_flow_runs_and_artifacts(scenario) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        for run, version in ((scenario.run1, "1"), (scenario.run2, "2")):
            tags = scenario.client.get_run(run.run_id).data.tags
            flow_run = client.read_flow_run(run.flow_run_id)
            assert tags["prefect.flow_run_id"] == str(flow_run.id)
            assert tags["prefect.flow_run_name"] == flow_run.name
            assert tags["mlflow.runName"] == flow_run.name
            assert client.read_flow(flow_run.flow_id).name == "training-pipeline"
            assert flow_run.state is not None and flow_run.state.is_completed()
            assert flow_run.parameters["overrides"] == run.overrides
            assert flow_run.deployment_id is None

            artifacts = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])
                )
            )
            by_type: dict[str, list] = {}
            for artifact in artifacts:
                by_type.setdefault(artifact.type, []).append(artifact)
            (summary,) = [a for a in by_type.get("markdown", []) if a.key]
            assert summary.key == "training-pipeline-summary"
            assert run.run_id in summary.data
            assert f"{MODEL} v{version}" in summary.data
            assert run.result["gate"]["decision"] in summary.data
            assert "IWAE bound with k=5" in summary.data
            nll = run.result["metrics"]["test_nll_iwae"]
            assert f"| `test/nll_iwae` (nats per image) | {nll:.2f} |" in summary.data
            view = "?workflowType=machine_learning"
            assert f"/#/models/{MODEL}/versions/{version}{view})" in summary.data
            images = {a.key: a.data for a in by_type.get("image", [])}
            assert set(images) == {"evaluation-samples", "evaluation-reconstructions"}
            assert f"run_uuid={run.run_id}" in images["evaluation-samples"]
            (progress,) = by_type["progress"]
            assert progress.key == "training-progress"
            assert float(progress.data) == 100.0


# --------------------------------------------------------------------------- people


def test_sample_from_the_champion(scenario, tmp_path: Path, capsys) -> None:
    from PIL import Image

    from flows.model_io import load_vae
    from vae_core.evaluation.images import grid_size

    out = tmp_path / "grid" / "x.png"
    argv = ["sample", "--model", f"models:/{MODEL}@champion", "-n", "16", "--out", str(out)]
    assert cli_main([*argv, "--workdir", str(scenario.ws)]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG"
        height, width = grid_size(16, 8)
        assert image.size == (width, height)
        assert len(set(image.convert("L").tobytes())) > 2  # drawn digits, not a blank grid

    champion = load_vae(f"models:/{MODEL}@champion")  # the champion is version 1
    v1 = load_vae(f"models:/{MODEL}/1")
    v2 = load_vae(f"models:/{MODEL}/2")

    def same(a, b) -> bool:
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(sa[k].equal(sb[k]) for k in sa)

    assert same(champion, v1) and not same(champion, v2)


def test_manual_promote_then_rollback_move_aliases(scenario) -> None:
    promote = scenario.manual["promote"]
    assert promote.rc == 0, promote.err
    assert "champion='2'" in promote.out
    assert promote.aliases == {"champion": "2", "previous-champion": "1", "challenger": "3"}
    v1, v2 = promote.tags["1"], promote.tags["2"]
    assert v2["manual.action"] == "promote"
    assert v2["manual.reason"] == PROMOTE_REASON
    assert v2["manual.actor"] == "pytest"
    assert v2["manual.previous_champion"] == "1"
    assert v2["manual.at"]
    assert v2["gate.decision"] == "reject"  # the gate's record stays as it was
    assert v1["manual.action"] == "demoted" and v1["manual.replaced_by"] == "2"
    assert PROMOTE_REASON in promote.descriptions["2"]

    # Promoting the champion again is refused with a clear error and changes nothing.
    again = scenario.manual["again"]
    assert again.rc == 2 and "already champion" in again.err
    assert (again.aliases, again.tags) == (promote.aliases, promote.tags)

    rollback = scenario.manual["rollback"]
    assert rollback.rc == 0, rollback.err
    assert rollback.aliases == {"champion": "1", "previous-champion": "2", "challenger": "3"}
    v1, v2 = rollback.tags["1"], rollback.tags["2"]
    assert v1["manual.action"] == "rollback-to"
    assert v1["manual.reason"] == ROLLBACK_REASON
    assert v1["manual.replaced"] == "2"
    assert v2["manual.action"] == "rolled-back" and v2["manual.replaced_by"] == "1"
    assert ROLLBACK_REASON in rollback.descriptions["1"]
    assert ROLLBACK_REASON in rollback.descriptions["2"]
    # The registry is left as the rollback left it (no test moves an alias).
    assert aliases(scenario) == rollback.aliases
