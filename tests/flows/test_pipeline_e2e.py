"""The `training-pipeline` flow end to end, no mocks: the Prefect test harness, a copy of the
prepared workspace with its SQLite MLflow store, and the `vae-pipeline` commands people use.

The scenario runs once, whole, before any test reads it; tiny models (hidden [32], latent 2),
an untrained one about 100 nats worse than a two-epoch one. A, 0 epochs: v1, champion (first
version, meets the floor). D, 2 epochs, dry-run: v2 would be promoted. S, 2 epochs: v3; between
the gate's decision and its apply a person promotes v2 by hand, so the decision is stale. U, A
again: up to date. F, A with --force: v4, rejected. X, 0 epochs, disabled: v5. M: a person
promotes v3, tries again (refused), rolls back to v2. K: `vae-pipeline run` of changed model
code in another process registers v6 and is SIGKILLed while it waits for the registry lock the
test holds; R, A again once the change is undone, closes K's books and is up to date with v4.
Tests only read, so they pass in any order."""

import contextlib
import io
import json
import math
import os
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import yaml
from helpers import git, prefect_client_env, spawn, wait_for
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from PIL import Image
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter

from flows import promotion, workspace
from flows.alias_log import read_history, registry_lock
from flows.cli import main as cli_main
from flows.lineage import data_lineage, model_code_hash
from flows.model_io import load_vae
from flows.params import load_params
from flows.pipeline import training_pipeline
from flows.registry import promote_version
from vae_core.evaluation.images import grid_size

pytestmark = pytest.mark.slow

MODEL = "mnist-vae"
EXPERIMENT = "vae-mnist"
STALE_REASON = "hand-picked while the gate was scoring"
PROMOTE_REASON = "manual check: promote version 3"
ROLLBACK_REASON = "roll back: version 3 draws the same digits"


def ov(epochs: int, mode: str = "enabled") -> list[str]:
    """The keys the scenario varies, always both: a run's overrides stay in params.yaml."""
    return [f"train.epochs={epochs}", f"promote.mode={mode}"]


def run_pipeline(ws: Path, overrides: list[str], force: bool = False) -> SimpleNamespace:
    state = training_pipeline(overrides=overrides, workdir=str(ws), force=force, return_state=True)
    assert state.is_completed(), f"flow run ended {state.type}: {state.message}"
    flow_run_id = state.state_details.flow_run_id
    return SimpleNamespace(overrides=overrides, flow_run_id=flow_run_id, **state.result())


def aliases(client) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()}


def manual_moves(ws: Path, client) -> dict[str, SimpleNamespace]:
    """What a person does after the runs: promote version 3 by hand, try again (refused),
    roll back. Each step's exit status, output, aliases, version tags and descriptions."""

    def step(*argv: str) -> SimpleNamespace:
        out, err = io.StringIO(), io.StringIO()  # never closed: see test_pipeline_faults
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli_main([*argv, "--workdir", str(ws), "--actor", "pytest"])
        versions = {v: client.get_model_version(MODEL, v) for v in ("2", "3")}
        done = SimpleNamespace(
            rc=rc, out=out.getvalue(), err=err.getvalue(), aliases=aliases(client)
        )
        done.tags = {v: dict(mv.tags) for v, mv in versions.items()}
        done.descriptions = {v: mv.description for v, mv in versions.items()}
        return done

    return {
        "promote": step("promote", "3", "--reason", PROMOTE_REASON),
        "again": step("promote", "3", "--reason", "again"),
        "rollback": step("rollback", "--reason", ROLLBACK_REASON),
    }


def killed_after_registering(ws: Path, client, prefect_api: str, logs: Path) -> SimpleNamespace:
    """Step K: a run of changed model code in another process, SIGKILLed at a point it reports
    (its version is registered and it waits for the registry lock, which the test holds).
    Returns what it left: its journal, its version's tags, the aliases."""
    code = ws / "vae_core" / "models" / "__init__.py"  # no DVC stage depends on it
    original = code.read_bytes()
    code.write_bytes(original + b"\n# a change to the model code\n")
    env = prefect_client_env(SimpleNamespace(api=prefect_api), logs, PYTHONPATH=str(ws))
    cmd = [sys.executable, "-m", "flows.cli", "run", "--workdir", str(ws)]
    cmd += [arg for o in ov(0) for arg in ("-S", o)]
    before = aliases(client)
    with registry_lock(client, MODEL, "pytest"):
        proc = spawn("killed-run", cmd, logs / "killed-run.log", env, ws)
        try:
            said = f"waiting for the registry lock '{MODEL}.lock' held by pytest"
            wait_for("the run to register and wait", lambda: said in proc.tail(400), 600, proc)
            journal = json.loads((ws / workspace.JOURNAL_NAME).read_text())["holder"]
            (mv,) = client.search_model_versions(f"run_id='{journal['mlflow.run_id']}'")
            os.killpg(proc.popen.pid, signal.SIGKILL)
            proc.popen.wait(60)
        finally:
            proc.stop()
    code.write_bytes(original)  # the change undone: the next run sees the code of v1 ... v5
    return SimpleNamespace(journal=journal, version=str(mv.version), tags=mv.tags, aliases=before)


@pytest.fixture(scope="module")
def scenario(prefect_harness, isolated_mlflow_uri, module_workspace, tmp_path_factory):
    ws = module_workspace("pipeline-e2e")
    lock_before = (ws / "dvc.lock").read_bytes()
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    a = run_pipeline(ws, ov(0))
    d = run_pipeline(ws, ov(2, "dry-run"))

    def decide_then_a_person_moves_the_champion(*args, **kwargs):
        scored = real_decide(*args, **kwargs)
        promote_version(MODEL, "2", STALE_REASON, "alice", client=client)
        return scored

    real_decide = promotion.decide
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(promotion, "decide", decide_then_a_person_moves_the_champion)
        s = run_pipeline(ws, ov(2))
    after_s = (aliases(client), read_history(client, MODEL))
    u = run_pipeline(ws, ov(0))
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    after_u = (aliases(client), versions, len(client.search_runs([experiment_id])))
    f = run_pipeline(ws, ov(0), force=True)
    x = run_pipeline(ws, ov(0, "disabled"))
    manual = manual_moves(ws, client)
    k = killed_after_registering(ws, client, prefect_harness, tmp_path_factory.mktemp("killed"))
    r = run_pipeline(ws, ov(0))
    return SimpleNamespace(
        ws=ws, client=client, head=git(ws, "rev-parse", "HEAD"), lock_before=lock_before,
        a=a, d=d, s=s, u=u, f=f, x=x, r=r, k=k, after_s=after_s, after_u=after_u, manual=manual,
    )  # fmt: skip


def tags(scenario, version: str, *keys: str):
    """A version's tags, or (with ``keys``) the values of those tags, in order."""
    found = dict(scenario.client.get_model_version(MODEL, version).tags)
    return tuple(found[k] for k in keys) if keys else found


#: Each run that trained: its version, gate decision, whether it moved an alias, the champion
#: it was scored against, the mode, and what the version's description says of it.
OUTCOMES = {
    "a": ("1", "promote", True, None, "enabled", "gate (enabled): now champion. no champion yet"),
    "d": ("2", "promote", False, "1", "dry-run", "gate (dry-run): dry-run, nothing moved; would"),
    "s": ("3", "stale", False, "1", "enabled", "gate (enabled): stale: the champion moved from 1"),
    "f": ("4", "reject", False, "2", "enabled", "gate (enabled): not promoted: "),
    "x": ("5", "not-evaluated", False, None, "disabled", "gate: disabled; aliases unchanged."),
}


def test_each_gate_decision_is_recorded_on_its_version_and_run(scenario) -> None:
    for name, (version, decision, applied, before, mode, said) in OUTCOMES.items():
        run = getattr(scenario, name)
        assert run.model == {"name": MODEL, "version": version}
        assert (run.gate["decision"], run.gate["applied"]) == (decision, applied), name
        assert run.gate.get("champion_before") == before
        keys = ("gate.mode", "gate.decision", "gate.applied", "mlflow.run_id")
        assert tags(scenario, version, *keys) == (mode, decision, str(applied).lower(), run.run_id)
        mv = scenario.client.get_model_version(MODEL, version)
        assert mv.run_id == run.run_id and f"Promotion {said}" in mv.description, name
        if decision != "not-evaluated":
            assert mv.tags["gate.reason"] == run.gate["reason"]
        mlflow_run = scenario.client.get_run(run.run_id)
        assert mlflow_run.info.status == "FINISHED", name
        assert mlflow_run.data.tags["gate.decision"] == decision
    # A: the first version meeting the floor. D: trained against untrained, it would promote.
    assert scenario.a.gate["reason"].startswith("no champion yet; challenger mean NLL")
    assert "<= floor 1000" in scenario.a.gate["reason"]
    assert scenario.d.gate["reason"].startswith("promoted: ")
    assert scenario.d.gate["figures"]["ci_low"] > 0
    assert "would promote" in scenario.client.get_model_version(MODEL, "2").description
    # X: disabled, so no figures at all.
    assert not any(k.startswith("gate.ci") for k in tags(scenario, "5"))


def test_a_stale_decision_moves_nothing_and_the_history_says_why(scenario) -> None:
    """S was decided against champion v1, which a person replaced by v2 meanwhile."""
    reason = scenario.s.gate["reason"]
    assert reason.startswith("stale: the champion moved from 1 to 2 while the gate scored")
    assert "The decision against 1 was: promoted: " in reason
    aliases_s, history = scenario.after_s
    assert aliases_s == {"champion": "2", "previous-champion": "1", "challenger": "3"}
    assert [(e["action"], e["alias"], e["from"], e["to"]) for e in history] == [
        ("registered", "challenger", None, "1"),
        ("gate promote", "champion", None, "1"),
        ("registered", "challenger", "1", "2"),
        ("registered", "challenger", "2", "3"),
        ("manual promote", "champion", "1", "2"),
        ("manual promote", "previous-champion", None, "1"),
    ]
    a_name = scenario.client.get_run(scenario.a.run_id).data.tags["prefect.flow_run_name"]
    a_actor = f"prefect flow run {a_name} ({scenario.a.flow_run_id})"  # A's register and gate
    assert [e["actor"] for e in history[:2] + history[4:]] == [a_actor] * 2 + ["alice"] * 2
    assert history[4]["reason"] == STALE_REASON
    assert history[1]["figures"]["n"] == 500  # the gate's figures travel along


def test_a_worse_run_is_rejected_on_paired_holdout_figures(scenario) -> None:
    gate, figures = scenario.f.gate, scenario.f.gate["figures"]
    reason = gate["reason"]
    assert reason.startswith("not promoted: ") and "improvement not significant" in reason
    assert figures["challenger_mean_nll"] > figures["champion_mean_nll"] + 20  # untrained
    assert figures["mean_improvement"] < 0 and figures["ci_high"] < 0
    # Decided on the holdout, not the test set, reusing the challenger's own evaluation; the
    # champion's side is D's holdout NLL (v2), computed again from the registered model.
    metrics, champion = scenario.f.metrics, scenario.d.metrics["holdout_nll_iwae"]
    assert figures["n"] == metrics["holdout_num_examples"] == 500
    assert figures["challenger_mean_nll"] == pytest.approx(metrics["holdout_nll_iwae"])
    assert figures["champion_mean_nll"] == pytest.approx(champion, rel=1e-5)
    assert figures["challenger_mean_nll"] != pytest.approx(metrics["test_nll_iwae"])
    v4 = tags(scenario, "4")
    assert float(v4["gate.champion_mean_nll"]) == pytest.approx(figures["champion_mean_nll"])
    assert float(v4["gate.mean_improvement"]) == pytest.approx(figures["mean_improvement"])
    assert "gate.previous_champion" not in v4
    assert scenario.client.get_run(scenario.f.run_id).data.params["train.epochs"] == "0"


def test_unchanged_is_up_to_date_until_forced_and_training_is_deterministic(scenario) -> None:
    u = scenario.u
    assert (u.gate["decision"], u.gate["applied"], u.run_id) == ("up-to-date", False, None)
    assert u.model == {"name": MODEL, "version": "1"}
    assert "up to date: mnist-vae v1" in u.gate["reason"] and "--force" in u.gate["reason"]
    # Registered nothing, moved nothing, started no MLflow run.
    assert scenario.after_u == (scenario.after_s[0], [1, 2, 3], 3)
    # The version says what it was made from; the skipped run matched exactly that.
    assert tags(scenario, "1", "dvc.processed_md5", "params.hash", "code.hash") == (
        data_lineage(scenario.ws)["processed_md5"],
        load_params(scenario.ws / "params.yaml", u.overrides).hash(),
        model_code_hash(),
    )
    # --force trains and registers anyway (v4). Deterministic training: the same weights and
    # figures untrained (v1, v4) and trained (v2, v3: runs differing only in promote.mode).
    for one, other in ((scenario.a, scenario.f), (scenario.d, scenario.s)):
        sa, sb = (
            load_vae(f"models:/{MODEL}/{r.model['version']}").state_dict() for r in (one, other)
        )
        assert sa.keys() == sb.keys() and all(sa[key].equal(sb[key]) for key in sa)
        assert one.figures == other.figures


def test_lineage_tags_match_dvc_lock_and_git(scenario) -> None:
    ws = scenario.ws
    lineage = data_lineage(ws)
    assert lineage["params_match_lock"] is True
    lock = yaml.safe_load((ws / "dvc.lock").read_text())["stages"]
    outs = {o["path"]: o["md5"] for stage in ("fetch", "prepare") for o in lock[stage]["outs"]}
    assert outs["data/raw/mnist"] == lineage["raw_md5"]
    assert outs["data/processed/mnist"] == lineage["processed_md5"]
    # No run changed a data parameter: DVC had nothing to redo and the lock is unchanged.
    assert (ws / "dvc.lock").read_bytes() == scenario.lock_before

    for run in (scenario.a, scenario.d):
        run_tags = scenario.client.get_run(run.run_id).data.tags
        params_hash = load_params(ws / "params.yaml", run.overrides).hash()
        expected = {f"dvc.{k}": lineage[k] for k in ("raw_md5", "processed_md5")}
        # The overrides are written into params.yaml (like `dvc exp run -S`): a dirty tree.
        expected |= {"git.commit": scenario.head, "git.dirty": "true", "params.hash": params_hash}
        expected |= {"data.dataset": "mnist", "data.source": "embedded", "device": "cpu"}
        expected |= {"prefect.flow_run_id": str(run.flow_run_id)}
        assert {k: run_tags.get(k) for k in expected} == expected
        assert run_tags["torch.version"] and run_tags["python.version"]
        assert "prefect.deployment" not in run_tags  # not scheduled: a plain flow call
        # The registered version carries the same lineage: the registry page alone says it.
        mv_tags = tags(scenario, run.model["version"])
        assert {k: mv_tags.get(k) for k in expected} == expected
        assert mv_tags["prefect.flow_run_name"] == run_tags["prefect.flow_run_name"]
    assert tags(scenario, "1", "params.hash") != tags(scenario, "2", "params.hash")


SECTIONS = ("train/", "val/", "test/", "holdout/", "sample_quality/", "schedule/", "time/")


def test_params_metrics_artifacts_figure_notes_and_images_by_step_are_logged(scenario) -> None:
    client, d = scenario.client, scenario.d
    run = client.get_run(d.run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == EXPERIMENT
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert experiment.artifact_location == (scenario.ws / "mlruns").resolve().as_uri()
    assert client.get_run(scenario.a.run_id).info.experiment_id == experiment.experiment_id
    # Every parameter (params.yaml with the overrides applied), once; the overrides, a tag.
    assert run.data.params == load_params(scenario.ws / "params.yaml", d.overrides).flat()
    assert run.data.tags["params.overrides"] == " ".join(d.overrides)
    assert run.data.params["train.epochs"] == "2"
    # Per-epoch training curves, with the epoch as the step.
    for key in ("train/neg_elbo", "val/neg_elbo", "val/kl", "schedule/lr"):
        history = client.get_metric_history(d.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key
        assert all(math.isfinite(m.value) for m in history)
    # Final figures, each once, under the sections the MLflow charts group by.
    metrics = run.data.metrics
    for key in ("test/neg_elbo", "test/nll_iwae", "val/best_neg_elbo", "train/best_epoch"):
        assert math.isfinite(metrics[key]), key
    assert 50 < metrics["test/nll_iwae"] < 1000
    # The flow's result (what `vae-pipeline run` prints) carries the headline figures.
    headline = ("test/nll_iwae", "test/neg_elbo", "val/best_neg_elbo", "holdout/nll_iwae")
    assert d.figures == {k: metrics[k] for k in headline}
    assert tags(scenario, "2", "metric.test/nll_iwae") == (f"{metrics['test/nll_iwae']:.4f}",)
    artifacts = {a.path for a in client.list_artifacts(d.run_id)}
    assert {"images", "evaluation", "loss_curve.png"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(d.run_id, "evaluation")}
    assert {"evaluation/metrics.json", "evaluation/samples.png"} <= evaluation
    # The artifacts are files under the workspace's mlruns/ (the local artifact root).
    assert run.info.artifact_uri.startswith((scenario.ws / "mlruns").resolve().as_uri() + "/")
    on_disk = Path(run.info.artifact_uri.removeprefix("file://"))
    assert (on_disk / "evaluation" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Every metric a figure in a section, none a setting, none twice (each configuration's
    # figures: test_mlflow_conventions). schedule/lr is a curve, not the setting train.lr.
    keys = {k for k in metrics if not k.startswith("system/")}
    assert keys and all(k.startswith(SECTIONS) for k in keys), sorted(keys)
    leaves = {k.split("/", 1)[1] for k in keys if not k.startswith("schedule/")}
    settings = {k.rsplit(".", 1)[-1] for k in run.data.params}  # train.lr -> lr, ...
    settings |= {"iwae_k", "iwae_test_size", "iwae_num_examples", "active_units_threshold"}
    settings |= {"latent_dim", "kid_subset_size", "kid_subsets", "num_samples", "test_size"}
    assert not leaves & (settings - {"epochs"}), sorted(leaves & settings)
    assert "train/epochs" in keys  # the epochs run (early stopping), not the setting
    assert [k for k in keys if "neg_elbo" in k and k.startswith("test/")] == ["test/neg_elbo"]
    assert not [k for k in keys if "label_frac" in k] and "schedule/kl_weight" not in keys
    assert "train/loss" not in keys  # the ELBO objective: the loss *is* train/neg_elbo

    # The run's description names each figure's estimator; samples of fixed z and
    # reconstructions of fixed validation images are logged every few epochs (every epoch of
    # this two-epoch run) from the initial weights at step 0 (where MLflow's image cards open),
    # so the UI shows how they improve; an untrained run shows step 0 only.
    note, nll = run.data.tags["mlflow.note.content"], metrics["test/nll_iwae"]
    assert f"| `test/nll_iwae` | {nll:.4g} | IWAE bound with k=2 " in note
    assert "binarized" in note and "| `test/neg_elbo` |" in note
    assert not [k for k in run.data.tags if k.endswith("_estimator") or k.startswith("png_")]
    v2 = scenario.client.get_model_version(MODEL, "2").description
    assert scenario.d.run_id in v2 and f"| `test/nll_iwae` | {nll:.2f} |" in v2

    def steps(run_id: str) -> dict[str, set[int]]:
        found: dict[str, set[int]] = {}
        for artifact in scenario.client.list_artifacts(run_id, "images"):
            if artifact.path.endswith(".png"):
                key, _, step, *_ = Path(artifact.path).name.removesuffix(".png").split("+")
                found.setdefault(key, set()).add(int(step))
        return found

    assert steps(scenario.d.run_id) == {"samples": {0, 1, 2}, "reconstructions": {0, 1, 2}}
    assert steps(scenario.a.run_id) == {"samples": {0}, "reconstructions": {0}}


def test_prefect_flow_runs_artifacts_and_an_event_for_each_decision(scenario) -> None:
    # Each run's event (other modules emit the same names for their own versions); dry-run,
    # stale and disabled are all "gated".
    wanted = {"a": "promoted 1", "d": "gated 2", "s": "gated 3", "u": "up-to-date 1"}
    wanted |= {"f": "rejected 4", "x": "gated 5", "r": "up-to-date 4"}
    runs = {f"prefect.flow-run.{getattr(scenario, r).flow_run_id}": r for r in wanted}
    only_ours = EventRelatedFilter(id=list(runs))
    filter_ = EventFilter(event=EventNameFilter(prefix=["vae.model."]), related=only_ours)

    def of_run(flow_run_id) -> ArtifactFilter:
        return ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))

    with get_client(sync_client=True) as client:
        # Events reach the API through a background client: wait for them, not for a clock.
        def seen():
            events = client.read_events(filter=filter_, limit=50).events
            events = {runs[r.id]: e for e in events for r in e.related if r.id in runs}
            return events if len(events) == len(wanted) else None

        events = wait_for("the scenario's events", seen, 120, every_s=0.5)
        found = {r: f"{e.event} {e.resource['mlflow.version']}" for r, e in events.items()}
        assert found == {r: f"vae.model.{e}" for r, e in wanted.items()}
        assert events["u"].resource.id == "mlflow.model-version.mnist-vae.1"
        assert events["u"].payload["params.hash"] and events["u"].payload["code.hash"]
        assert events["s"].payload["reason"] == scenario.s.gate["reason"]
        assert events["f"].payload["run_id"] == scenario.f.run_id
        improvement = scenario.f.gate["figures"]["mean_improvement"]
        assert events["f"].payload["mean_improvement"] == improvement
        summaries = client.read_artifacts(artifact_filter=of_run(scenario.u.flow_run_id))
        (summary,) = [a for a in summaries if a.key == "training-pipeline-summary"]
        assert "up to date: mnist-vae v1" in summary.data

        for run in (scenario.a, scenario.d):
            run_tags = scenario.client.get_run(run.run_id).data.tags
            flow_run = client.read_flow_run(run.flow_run_id)
            assert run_tags["prefect.flow_run_id"] == str(flow_run.id)
            assert run_tags["prefect.flow_run_name"] == run_tags["mlflow.runName"] == flow_run.name
            assert client.read_flow(flow_run.flow_id).name == "training-pipeline"
            assert flow_run.state is not None and flow_run.state.is_completed()
            assert flow_run.parameters["overrides"] == run.overrides
            assert flow_run.deployment_id is None

            by_type: dict[str, list] = {}
            for artifact in client.read_artifacts(artifact_filter=of_run(flow_run.id)):
                by_type.setdefault(artifact.type, []).append(artifact)
            (summary,) = [a for a in by_type.get("markdown", []) if a.key]
            assert summary.key == "training-pipeline-summary"
            version = run.model["version"]
            assert run.run_id in summary.data and f"{MODEL} v{version}" in summary.data
            assert run.gate["decision"] in summary.data and "IWAE bound with k=2" in summary.data
            nll = run.metrics["test_nll_iwae"]
            assert f"| `test/nll_iwae` (nats per image) | {nll:.2f} |" in summary.data
            view = "?workflowType=machine_learning"
            assert f"/#/models/{MODEL}/versions/{version}{view})" in summary.data
            images = {a.key: a.data for a in by_type.get("image", [])}
            assert set(images) == {"evaluation-samples", "evaluation-reconstructions"}
            assert f"run_uuid={run.run_id}" in images["evaluation-samples"]
            (progress,) = by_type["progress"]
            assert progress.key == "training-progress" and float(progress.data) == 100.0


def test_sample_from_the_champion(scenario, tmp_path: Path, capsys) -> None:
    out = tmp_path / "grid" / "x.png"
    argv = ["sample", "--model", f"models:/{MODEL}@champion", "-n", "16", "--out", str(out)]
    assert cli_main([*argv, "--workdir", str(scenario.ws)]) == 0
    assert str(out) in capsys.readouterr().out
    with Image.open(out) as image:
        assert (image.format, image.size[::-1]) == ("PNG", grid_size(16, 8))  # (height, width)
        assert len(set(image.convert("L").tobytes())) > 2  # drawn digits, not a blank grid

    # A version is a served model (pyfunc); loading by alias: test_registry.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    images = served.predict(np.zeros((1, 1, 28, 28), np.float32), {"method": "sample", "n": 3})
    assert images.shape == (3, 1, 28, 28) and 0 <= images.min() <= images.max() <= 1


def test_manual_promote_then_rollback_move_aliases(scenario) -> None:
    promote = scenario.manual["promote"]
    assert promote.rc == 0 and "champion='3'" in promote.out, promote.err
    assert promote.aliases == {"champion": "3", "previous-champion": "2", "challenger": "5"}
    v2, v3 = promote.tags["2"], promote.tags["3"]
    manual = ("action", "reason", "actor", "previous_champion")
    assert tuple(v3[f"manual.{k}"] for k in manual) == ("promote", PROMOTE_REASON, "pytest", "2")
    assert v3["manual.at"] and v3["gate.decision"] == "stale"  # the gate's record stays
    assert (v2["manual.action"], v2["manual.replaced_by"]) == ("demoted", "3")
    assert PROMOTE_REASON in promote.descriptions["3"]
    # Promoting the champion again is refused with a clear error and changes nothing.
    again = scenario.manual["again"]
    assert again.rc == 2 and "already champion" in again.err
    assert (again.aliases, again.tags) == (promote.aliases, promote.tags)

    rollback = scenario.manual["rollback"]
    assert rollback.rc == 0, rollback.err
    assert rollback.aliases == {"champion": "2", "previous-champion": "3", "challenger": "5"}
    v2, v3 = rollback.tags["2"], rollback.tags["3"]
    manual = ("action", "reason", "replaced")
    assert tuple(v2[f"manual.{k}"] for k in manual) == ("rollback-to", ROLLBACK_REASON, "3")
    assert (v3["manual.action"], v3["manual.replaced_by"]) == ("rolled-back", "2")
    assert all(ROLLBACK_REASON in rollback.descriptions[v] for v in ("2", "3"))
    # The registry is left as the rollback left it (no later step moves an alias).
    assert aliases(scenario.client) == rollback.aliases


def test_changed_model_code_retrains_and_a_dead_run_s_books_are_closed(scenario) -> None:
    """K trained and registered a new version although data and parameters matched v1 and v4:
    the model code had changed. It died holding the workspace after registering; the next run
    marked its MLflow run FAILED and its flow run CRASHED, deleted its version, moved no alias,
    put the workspace back, and found itself up to date once the code was as before."""
    k, client = scenario.k, scenario.client
    assert k.version == "6"
    same = ("dvc.processed_md5", "params.hash")
    assert tuple(k.tags[key] for key in same) == tags(scenario, "4", *same)
    assert k.tags["code.hash"] != tags(scenario, "4")["code.hash"] == model_code_hash()

    dead_run = client.get_run(k.journal["mlflow.run_id"])
    assert dead_run.info.status == "FAILED"
    assert dead_run.data.tags["failure.reason"].startswith("WorkerDied: its process died holding")
    with pytest.raises(MlflowException):
        client.get_model_version(MODEL, "6")
    assert aliases(client) == k.aliases == scenario.manual["rollback"].aliases
    with get_client(sync_client=True) as prefect:
        dead_flow_run = prefect.read_flow_run(k.journal["prefect.flow_run_id"])
    assert dead_flow_run.state.type.value == "CRASHED"
    assert not (scenario.ws / workspace.JOURNAL_NAME).exists()
    r = scenario.r
    assert (r.gate["decision"], r.model["version"], r.run_id) == ("up-to-date", "4", None)
