"""`vae-pipeline sweep` end to end, no mocks: a local Dask cluster of two worker processes, the
session's Prefect API and an MLflow SQLite store in a copy of the prepared workspace.

The scenario runs once for the module: a three-trial grid of one-epoch trainings (one trial
fails) on the Dask cluster through `run_sweep`; the same sweep through the `sweep` subcommand,
which must reuse every trial; once more on threads with `retry_failed`, which must run the
failed trial only. The definition and plan are checked without running in test_sweep_spec."""

import contextlib
import importlib
import io
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from distributed import Client, LocalCluster
from mlflow import MlflowClient
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter as Artifacts
from prefect.client.schemas.filters import ArtifactFilterFlowRunId as ArtifactFlowRuns
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

from flows.cli import main
from flows.sweep.flow import child_runs, local_cluster_kwargs, run_sweep

pytestmark = pytest.mark.slow

MODEL = "mnist-vae"
EXPERIMENT = "vae-mnist"
OVERRIDES = ["train.epochs=1"]  # the prepared workspace's params.yaml has the tiny rest

#: Two trials that train and one that cannot: with a KL weight of 1e38 the first batch's loss
#: overflows float32 to inf, and the trainer stops with NonFiniteLossError before any step.
SWEEP = """\
sweep:
  name: tiny
  method: grid
  metric: val/best_neg_elbo
  parameters:
    variant:
      - {model.latent_dim: 2, train.beta: 1.0}
      - {model.latent_dim: 8, train.beta: 1.0}
      - {model.latent_dim: 8, train.beta: 1.0e+38}
"""
FAILING = "t02"
#: What a trial imports; see the `dask_cluster` fixture.
WARM_MODULES = ("flows.pipeline", "vae_core.training", "vae_core.evaluation", "flows.model_io")


def snapshot(client, experiment_id: str, parent_id: str) -> dict[str, tuple]:
    return {
        r.info.run_id: (r.info.run_name, r.info.status, r.info.start_time, r.info.end_time)
        for r in child_runs(client, experiment_id, parent_id)
    }


@pytest.fixture(scope="module")
def dask_cluster(isolated_mlflow_uri):
    """A real single-machine Dask cluster: two worker processes of one thread each. Started
    after the MLflow URI is reset, so the workers inherit no other module's tracking URI."""
    with LocalCluster(**local_cluster_kwargs(2)) as cluster, Client(cluster) as client:
        # Import the code while the Prefect server starts, as a long-lived cluster would have.
        warm = [
            client.submit(importlib.import_module, module, workers=[worker], pure=False)
            for worker in cluster.scheduler_info["workers"]
            for module in WARM_MODULES
        ]
        yield cluster
        del warm


@pytest.fixture(scope="module")
def scenario(dask_cluster, prefect_harness, isolated_mlflow_uri, module_workspace):
    ws = module_workspace("sweep")
    (ws / "sweep-tiny.yaml").write_text(SWEEP)
    address = dask_cluster.scheduler_address
    workers = set(dask_cluster.scheduler_info["workers"])

    first = run_sweep("sweep-tiny.yaml", OVERRIDES, str(ws), dask_address=address)
    parent_id = first["parent_run_id"]
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    after_first = snapshot(client, experiment_id, parent_id)

    # The same sweep again, as a person would start it: through the subcommand.
    argv = ["sweep", "--workdir", str(ws), "--sweep-file", "sweep-tiny.yaml"]
    argv += ["--dask-address", address, *(a for o in OVERRIDES for a in ("-S", o))]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        second = {"parent_run_id": parent_id, "code": main(argv), "stdout": out.getvalue()}
    after_second = snapshot(client, experiment_id, parent_id)
    parent_after_second = client.get_run(parent_id)

    # Once more, on the default task runner (in this process), retrying failed trials.
    third = run_sweep("sweep-tiny.yaml", OVERRIDES, str(ws), retry_failed=True)
    after_third = snapshot(client, experiment_id, parent_id)
    return SimpleNamespace(
        ws=ws, client=client, experiment_id=experiment_id, workers=workers, first=first,
        second=second, third=third, after_first=after_first, after_second=after_second,
        after_third=after_third, parent_after_second=parent_after_second,
    )  # fmt: skip


def children(scenario) -> dict[str, object]:
    """Child runs by trial label (t00, t01, ...)."""
    runs = child_runs(scenario.client, scenario.experiment_id, scenario.first["parent_run_id"])
    first = [r for r in runs if r.info.run_id in scenario.after_first]
    return {r.info.run_name.rsplit("-", 1)[-1]: r for r in first}


def test_trials_are_child_runs_with_the_same_keys_only_the_forced_one_fails(scenario) -> None:
    runs = children(scenario)
    assert sorted(runs) == ["t00", "t01", "t02"]
    parent_id = scenario.first["parent_run_id"]
    for label, run in runs.items():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent_id and run.info.run_name == f"tiny-{label}"
        assert tags["sweep.role"] == "trial" and tags["sweep.trial"] == str(int(label[1:]))
        assert tags["dvc.processed_md5"].endswith(".dir")
    assert len({r.data.tags["sweep.trial_key"] for r in runs.values()}) == 3
    # The experiment holds this sweep only: parent, three children, the failed one's retry.
    assert len(scenario.client.search_runs([scenario.experiment_id])) == 1 + 3 + 1

    # One set of parameter names for every child (MLflow's compare view lines them up) ...
    (param_keys,) = {frozenset(r.data.params) for r in runs.values()}
    assert {"model.latent_dim", "train.beta", "train.lr"} <= param_keys
    assert [runs[t].data.params["model.latent_dim"] for t in sorted(runs)] == ["2", "8", "8"]
    assert all(r.data.params["train.epochs"] == "1" for r in runs.values())
    # ... and of metric names for every finished child (system metrics, sampled on a clock, aside)
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    (metric_keys, *others) = {
        frozenset(k for k in r.data.metrics if not k.startswith("system/")) for r in finished
    }
    assert len(finished) == 2 and not others
    assert {"val/best_neg_elbo", "test/neg_elbo", "test/nll_iwae", "val/neg_elbo"} <= metric_keys

    # On the cluster's worker processes, one thread each (Dask sets OMP_NUM_THREADS=1).
    used = {r.data.tags["sweep.worker"] for r in runs.values()}
    assert used <= scenario.workers, (used, scenario.workers)
    threads = {(r.data.tags["device"], r.data.tags["torch.num_threads"]) for r in runs.values()}
    assert threads == {("cpu", "1")}
    # Each finished child has its logged model and evaluation: gated from any machine.
    for run in finished:
        assert run.data.tags["sweep.model_uri"].startswith("models:/")
        names = {a.path for a in scenario.client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/per_example_nll.npy" in names

    failed = runs[FAILING]
    assert (failed.info.status, failed.data.params["train.beta"]) == ("FAILED", "1.0e+38")
    assert failed.data.tags["failure.reason"].startswith("NonFiniteLossError: training loss")
    assert "sweep.complete" not in failed.data.tags
    done = [(runs[t].info.status, runs[t].data.tags["sweep.complete"]) for t in ("t00", "t01")]
    assert done == [("FINISHED", "true")] * 2
    counts = {"trials": 3, "finished": 2, "failed": 1, "reused": 0, "ran": 3}
    assert scenario.first["counts"] == counts
    row = {r["trial"]: r for r in scenario.first["rows"]}[FAILING]
    assert row["status"] == "FAILED" and "NonFiniteLossError" in row["note"]
    assert row["val/best_neg_elbo"] is None


def test_parent_holds_the_definition_and_the_summary_table(scenario) -> None:
    client, parent_id = scenario.client, scenario.first["parent_run_id"]
    parent = client.get_run(parent_id)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and "mlflow.parentRunId" not in tags
    assert tags["sweep.role"] == "parent" and tags["sweep.name"] == "tiny"
    assert tags["sweep.key"] == scenario.first["sweep_key"]
    assert tags["sweep.metric"] == "val/best_neg_elbo" and tags["sweep.goal"] == "min"
    params = parent.data.params
    assert params["sweep.method"] == "grid" and params["sweep.num_trials"] == "3"
    assert "model.latent_dim: 8" in params["sweep.space.variant"]
    assert params["train.epochs"] == "1"  # the base, with the -S overrides
    assert parent.data.metrics["sweep/finished"] == 2 and parent.data.metrics["sweep/failed"] == 1

    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"sweep", "sweep_summary.md"} <= artifacts
    definition = Path(client.download_artifacts(parent_id, "sweep/sweep.yaml")).read_text()
    definition = yaml.safe_load(definition)
    assert definition["sweep"] == yaml.safe_load(SWEEP)["sweep"]
    assert [t["label"] for t in definition["trials"]] == ["t00", "t01", "t02"]

    # The latest attempt's summary (the retry's, see the scenario); the first's is checked here.
    latest = Path(client.download_artifacts(parent_id, "sweep_summary.md")).read_text()
    assert latest == scenario.third["summary_markdown"]
    summary = scenario.first["summary_markdown"]
    assert scenario.first["table_markdown"] in summary and "**Winner: t0" in summary
    header = scenario.first["table_markdown"].splitlines()[0]
    rows, runs = scenario.first["rows"], children(scenario)
    assert {r["trial"]: r["run_id"] for r in rows} == {t: r.info.run_id for t, r in runs.items()}
    assert [r["trial"] for r in rows] == ["t00", "t01", "t02"]
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED"]
    (winner,) = [r for r in rows if r["run_id"] == scenario.first["best"]["run_id"]]
    assert winner["note"] == "best: mnist-vae v1, gate promote"
    columns = ("val/best_neg_elbo", "test/nll_iwae", "sample_quality/fd")
    for column in ("model.latent_dim", "train.beta", *columns):
        assert f"| {column} |" in header
    for row in rows:  # each row is read back from its child run, and is a line of the table
        assert f"| {row['trial']} |" in summary and (row["run_id"] in summary)
        if row["status"] == "FINISHED":
            for column in columns:  # the table's columns are the child runs' metric names
                assert row[column] == pytest.approx(runs[row["trial"]].data.metrics[column])


def test_best_trial_is_registered_and_gated(scenario) -> None:
    client, first = scenario.client, scenario.first
    finished = [r for r in first["rows"] if r["status"] == "FINISHED"]
    best = min(finished, key=lambda r: r["val/best_neg_elbo"])
    assert (first["best"]["trial"], first["best"]["run_id"]) == (best["trial"], best["run_id"])
    assert first["model"] == {"name": MODEL, "version": "1"}
    gate = first["gate"]  # the first version, meeting the floor
    assert (gate["decision"], gate["applied"]) == ("promote", True)
    assert gate["reason"].startswith("no champion yet")

    mv = client.get_model_version(MODEL, "1")
    assert mv.run_id == best["run_id"]
    tags = dict(mv.tags)
    assert tags["gate.decision"] == "promote" and tags["gate.mode"] == "enabled"
    assert tags["sweep.parent_run_id"] == first["parent_run_id"]
    assert tags["sweep.trial"] == str(int(best["trial"][1:]))
    assert tags["dvc.processed_md5"].endswith(".dir")
    best_figure = pytest.approx(best["val/best_neg_elbo"], abs=1e-3)
    assert float(tags["metric.val/best_neg_elbo"]) == best_figure
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"

    parent_tags = client.get_run(first["parent_run_id"]).data.tags
    keys = ("sweep.best_run_id", "sweep.model_version", "gate.decision")
    assert [parent_tags[k] for k in keys] == [best["run_id"], "1", "promote"]
    assert client.get_run(best["run_id"]).data.tags["sweep.winner"] == "true"


def test_rerun_reuses_finished_trials(scenario) -> None:
    # No new child run, the others untouched (ids, statuses, times); versions: the retry's test.
    assert scenario.after_second == scenario.after_first
    parent = scenario.parent_after_second
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.attempt"] == "2"
    assert parent.data.metrics["sweep/ran"] == 0 and parent.data.metrics["sweep/reused"] == 3

    out = scenario.second["stdout"]
    assert scenario.second["code"] == 0 and f"-> {MODEL} v1; gate promote" in out
    assert "| trial | model.latent_dim | train.beta | status |" in out
    assert all(run_id in out for run_id in scenario.after_first)


def test_prefect_flow_runs_tasks_and_table_artifact(scenario) -> None:
    first_id = scenario.first["flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(first_id)
        assert client.read_flow(flow_run.flow_id).name == "vae-sweep"
        assert flow_run.state is not None and flow_run.state.is_completed()
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [first_id]}))
        states = {t.name: t.state.type.value for t in tasks if t.name.startswith("trial-")}
        assert states == {"trial-t00": "COMPLETED", "trial-t01": "COMPLETED", "trial-t02": "FAILED"}
        names = [t.name.rsplit("-", 1)[0] for t in tasks]
        # The pipeline's own tasks did the work: three trainings, two evaluations.
        assert names.count("train_model") == 3 and names.count("evaluate") == 2
        assert names.count("fetch_data") == names.count("prepare_data") == 1
        assert names.count("register") == names.count("promote") == 1

        artifacts = client.read_artifacts(
            artifact_filter=Artifacts(flow_run_id=ArtifactFlowRuns(any_=[first_id]))
        )
        summary = {a.key: a for a in artifacts if a.key}["vae-sweep-summary"]
        assert summary.type == "markdown" and summary.data == scenario.first["summary_markdown"]

        # The resumed sweep submitted no trial; the retry submitted the failed one only.
        reruns = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep-tiny"]))
        )
        assert len(reruns) == 3
        assert all(r.state is not None and r.state.is_completed() for r in reruns)
        third_id = scenario.third["flow_run_id"]
        (second,) = [r.id for r in reruns if str(r.id) not in (first_id, third_id)]
        for run_id, expected in ((second, set()), (third_id, {"trial-t02"})):
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run_id]}))
            assert {t.name for t in tasks if t.name.startswith("trial-")} == expected
            assert len([t for t in tasks if t.name.startswith("train_model")]) == len(expected)


def test_retry_failed_runs_only_the_failed_trial_again(scenario) -> None:
    third = scenario.third
    assert third["parent_run_id"] == scenario.first["parent_run_id"]
    assert third["counts"] == {"trials": 3, "finished": 2, "failed": 1, "reused": 2, "ran": 1}
    (new_id,) = set(scenario.after_third) - set(scenario.after_first)
    assert scenario.after_third[new_id][:2] == ("tiny-t02", "FAILED")
    # The finished trials (and the first failure, as history) are untouched.
    assert {k: scenario.after_third[k] for k in scenario.after_first} == scenario.after_first
    new_t02, old_t02 = scenario.client.get_run(new_id), children(scenario)[FAILING]
    assert new_t02.data.tags["sweep.trial_key"] == old_t02.data.tags["sweep.trial_key"]
    rows = {r["trial"]: r for r in third["rows"]}
    assert rows[FAILING]["run_id"] == new_id and rows[FAILING]["status"] == "FAILED"
    assert rows["t00"]["reused"] and rows["t01"]["reused"]
    # Same winner: not registered again (rerun, retry); the earlier gate decision stands.
    assert third["model"] == {"name": MODEL, "version": "1"}
    assert third["gate"]["from_earlier_attempt"] is True
    assert len(scenario.client.search_model_versions(f"name='{MODEL}'")) == 1
