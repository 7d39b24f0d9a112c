"""`vae-pipeline sweep` end to end, with no mocks: a real local Dask cluster of two worker
processes, the session's real Prefect API (the test harness), a real MLflow SQLite store in a
throw-away git + DVC workspace, and the real `dvc` CLI for the data stages.

The scenario (run once for the module): a three-trial grid of one-epoch trainings, one of which
(KL weight 1e38: the loss overflows float32 at the first step) fails, runs on the Dask cluster
through `run_sweep`; then the same sweep runs again through the `sweep` subcommand, which must
reuse every trial, and once more on threads with `retry_failed`, which must run the failed trial
only. Each test reads one aspect back from MLflow, the registry or Prefect. The first tests need
none of that: they check the sweep file, the trial grid and the task runners.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from flows.params import Params, load_params
from flows.sweep import SweepError, parse_sweep
from flows.sweep.flow import run_sweep
from flows.sweep.trials import expand_trials, plan_trials, sweep_key, trial_key, with_keys

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "mnist-vae"
EXPERIMENT = "vae-mnist"

#: Two trials that train and one that cannot: with a KL weight of 1e38 the first batch's loss
#: overflows float32 to inf, and the trainer stops with NonFiniteLossError before any step.
SWEEP = {
    "sweep": {
        "name": "tiny",
        "method": "grid",
        "metric": "val_neg_elbo",
        "parameters": {
            "variant": [
                {"model.latent_dim": 2, "train.beta": 1.0},
                {"model.latent_dim": 8, "train.beta": 1.0},
                {"model.latent_dim": 8, "train.beta": 1.0e38},
            ]
        },
    }
}
FAILING = "t02"
#: What a trial imports; see the `dask_cluster` fixture.
WARM_MODULES = ("flows.pipeline", "vae_core.training", "vae_core.evaluation", "flows.model_io")


@pytest.fixture(scope="module")
def base() -> Params:
    return load_params(REPO_ROOT / "params.yaml")


# --------------------------------------------------------------------------- the sweep file


def test_repo_sweep_file_is_valid(base) -> None:
    from flows.sweep import load_sweep

    spec = load_sweep(REPO_ROOT / "sweep.yaml")
    trials = expand_trials(spec, base)
    assert spec.method == "grid" and spec.metric == "val_neg_elbo"
    expected = 1
    for choices in spec.parameters.values():
        expected *= len(choices)
    assert len(trials) == expected >= 2
    assert all(set(t.overrides) == set(spec.parameters) for t in trials)


def test_grid_with_a_group_sets_keys_together(base) -> None:
    spec = parse_sweep(
        {
            "parameters": {
                "model.latent_dim": [10, 20],
                "likelihood": [
                    {"model.likelihood": "bernoulli", "train.data_variant": "binarized"},
                    {
                        "model.likelihood": "continuous_bernoulli",
                        "train.data_variant": "continuous",
                    },
                ],
            }
        }
    )
    trials = expand_trials(spec, base)
    assert len(trials) == 4
    pairs = {(t.params.model.likelihood, t.params.train.data_variant) for t in trials}
    assert pairs == {("bernoulli", "binarized"), ("continuous_bernoulli", "continuous")}
    assert [t.params.model.latent_dim for t in trials] == [10, 10, 20, 20]
    # everything not swept is the base's
    assert all(t.params.data == base.data for t in trials)
    assert all(t.params.train.lr == base.train.lr for t in trials)


def test_random_search_is_seeded_and_draws_distinct_trials(base) -> None:
    definition = {
        "method": "random",
        "num_trials": 6,
        "seed": 3,
        "parameters": {
            "train.lr": {"log_uniform": [0.0001, 0.01]},
            "model.latent_dim": {"int_uniform": [2, 64]},
            "model.architecture": ["mlp", "conv"],
        },
    }
    first = expand_trials(parse_sweep(definition), base)
    again = expand_trials(parse_sweep(definition), base)
    assert [t.overrides for t in first] == [t.overrides for t in again]
    assert len({json.dumps(t.overrides, sort_keys=True) for t in first}) == 6
    assert all(0.0001 <= t.params.train.lr <= 0.01 for t in first)
    other = expand_trials(parse_sweep(definition | {"seed": 4}), base)
    assert [t.overrides for t in other] != [t.overrides for t in first]


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ({"parameters": {"model.latent_dimm": [2]}}, "did you mean 'model.latent_dim'"),
        ({"parameters": {"data.val_size": [100, 200]}}, "cannot vary within a sweep"),
        ({"parameters": {"train.lr": [0.001, 0.001]}}, "more than once"),
        ({"parameters": {"train.lr": {"log_uniform": [0.001, 0.01]}}}, "need method random"),
        ({"method": "random", "parameters": {"train.lr": [0.001]}}, "needs num_trials"),
        ({"metric": "val_elbo", "parameters": {"train.lr": [0.001]}}, "did you mean"),
        (
            {"metric": "test_nll_iwae", "parameters": {"train.lr": [0.001]}},
            "measured on the test set, which is only reported and never decides anything",
        ),
        ({"metric": "sq_fd", "parameters": {"train.lr": [0.001]}}, "expected one of val_neg_elbo"),
        (
            {"parameters": {"train.beta": [1.0], "g": [{"train.beta": 2.0}]}},
            "set by both",
        ),
        ({"parameters": {"g": [{"train.beta": 2.0}, {"train.lr": 0.1}]}}, "the same keys"),
        ({"parametres": {"train.lr": [0.001]}}, "did you mean 'parameters'"),
    ],
)
def test_bad_sweep_definitions_are_refused(definition: dict, message: str) -> None:
    with pytest.raises(SweepError, match=message.replace("(", r"\(")):
        parse_sweep(definition)


def test_a_trial_value_outside_the_schema_is_refused_before_anything_runs(base) -> None:
    spec = parse_sweep({"parameters": {"train.lr": [0.001, 2.0]}})
    with pytest.raises(SweepError, match=r"trial 1 \(train.lr=2.0\).*train.lr = 2.0"):
        expand_trials(spec, base)


def test_keys_follow_parameters_and_data(base) -> None:
    spec = parse_sweep({"parameters": {"train.lr": [0.001, 0.002]}})
    a = with_keys(expand_trials(spec, base), "md5-a")
    b = with_keys(expand_trials(spec, base), "md5-b")
    assert a[0].key != a[1].key  # different parameters
    assert a[0].key != b[0].key  # same parameters, different data
    assert a[0].key == trial_key(a[0].params, "md5-a")
    assert sweep_key(spec, a) != sweep_key(spec, b)
    assert sweep_key(spec, a) == sweep_key(spec, with_keys(expand_trials(spec, base), "md5-a"))


def test_plan_reuses_finished_keeps_failed_and_resumes_interrupted(base) -> None:
    spec = parse_sweep({"parameters": {"train.lr": [0.001, 0.002, 0.003, 0.004, 0.005, 0.006]}})
    t = with_keys(expand_trials(spec, base), "md5")
    existing = {
        t[0].key: ("r0", "FINISHED", True),
        t[1].key: ("r1", "FAILED", False),
        t[2].key: ("r2", "RUNNING", False),  # the process was killed mid-training
        t[3].key: ("r3", "FINISHED", False),  # killed after training, before evaluation ended
        t[4].key: ("r4", "SCHEDULED", False),  # never started
    }
    assert plan_trials(t, existing) == {
        0: ("done", "r0"),
        1: ("keep-failed", "r1"),
        2: ("resume", "r2"),
        3: ("resume", "r3"),
        4: ("resume", "r4"),
        5: ("new", None),
    }
    assert plan_trials(t, existing, retry_failed=True)[1] == ("new", None)


# --------------------------------------------------------------------------- task runners


def test_task_runners() -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.sweep.flow import local_cluster_kwargs, task_runner

    threads = task_runner()  # one trial at a time in this process
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 1
    assert task_runner(max_workers=3)._max_workers == 3

    local = task_runner(dask_workers=2)  # --dask-workers: a new local cluster
    assert isinstance(local, DaskTaskRunner)
    kwargs = local.cluster_kwargs
    assert kwargs == local_cluster_kwargs(2)
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (2, 1, True)
    assert kwargs["host"] == "127.0.0.1"
    remote = task_runner(dask_address="tcp://127.0.0.1:8786")  # --dask-address: as is
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://127.0.0.1:8786"
    with pytest.raises(SweepError, match="omit it with --dask-address"):
        task_runner(dask_address="tcp://127.0.0.1:8786", dask_workers=2)
    with pytest.raises(SweepError, match="--max-workers: expected an integer >= 1"):
        task_runner(max_workers=0)


def test_a_bad_sweep_is_refused_before_prefect_starts(tmp_path) -> None:
    (tmp_path / "params.yaml").write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    (tmp_path / "bad.yaml").write_text("sweep:\n  parameters: {train.lr: [0.001, 2.0]}\n")
    with pytest.raises(SweepError, match=r"trial 1 \(train.lr=2.0\)"):
        run_sweep("bad.yaml", workdir=str(tmp_path))
    assert not (tmp_path / "mlflow.db").exists()


# --------------------------------------------------------------------------- the scenario


def snapshot(client, experiment_id: str, parent_id: str) -> dict[str, tuple]:
    from flows.sweep.flow import child_runs

    return {
        r.info.run_id: (r.info.run_name, r.info.status, r.info.start_time, r.info.end_time)
        for r in child_runs(client, experiment_id, parent_id)
    }


@pytest.fixture(scope="module")
def dask_cluster(isolated_mlflow_uri):
    """A real single-machine Dask cluster: two worker processes of one thread each. Started
    after the MLflow URI is reset, so the workers inherit no other module's tracking URI."""
    from distributed import Client, LocalCluster

    from flows.sweep.flow import local_cluster_kwargs

    kwargs = local_cluster_kwargs(2)
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (2, 1, True)
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        # A long-lived cluster's workers have imported the code before a sweep comes; let
        # these do it while the Prefect server and the data stages start (~30 s here).
        warm = [
            client.submit(importlib.import_module, module, workers=[worker], pure=False)
            for worker in cluster.scheduler_info["workers"]
            for module in WARM_MODULES
        ]
        yield cluster
        del warm


@pytest.fixture(scope="module")
def scenario(dask_cluster, prefect_harness, isolated_mlflow_uri, workspace_factory, tiny_overrides):
    from mlflow import MlflowClient

    ws = workspace_factory("sweep")
    (ws / "sweep-tiny.yaml").write_text(yaml.safe_dump(SWEEP, sort_keys=False))
    address = dask_cluster.scheduler_address
    workers = set(dask_cluster.scheduler_info["workers"])

    start = time.monotonic()
    first = run_sweep("sweep-tiny.yaml", tiny_overrides, str(ws), dask_address=address)
    first_s = time.monotonic() - start
    client = MlflowClient(f"sqlite:///{ws / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    after_first = snapshot(client, experiment_id, first["parent_run_id"])
    versions_after_first = client.search_model_versions(f"name='{MODEL}'")

    # The same sweep again, as a person would start it: through the subcommand.
    from flows.cli import main

    argv = ["sweep", "--workdir", str(ws), "--sweep-file", "sweep-tiny.yaml"]
    argv += ["--dask-address", address]
    for override in tiny_overrides:
        argv += ["-S", override]
    out = io.StringIO()
    start = time.monotonic()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    second_s = time.monotonic() - start
    second = {
        "parent_run_id": first["parent_run_id"],
        "stdout": out.getvalue(),
        "code": code,
    }
    after_second = snapshot(client, experiment_id, first["parent_run_id"])
    parent_after_second = client.get_run(first["parent_run_id"])

    # Once more, on the default task runner (one trial at a time in this process), asking for
    # failed trials to run again.
    start = time.monotonic()
    third = run_sweep("sweep-tiny.yaml", tiny_overrides, str(ws), retry_failed=True)
    third_s = time.monotonic() - start
    after_third = snapshot(client, experiment_id, first["parent_run_id"])
    print(
        f"\nworkspace {ws}\nsweep run 1: {first_s:.0f} s, run 2 (resume): {second_s:.0f} s, "
        f"run 3 (retry failed): {third_s:.0f} s"
    )
    print(second["stdout"])
    return SimpleNamespace(
        ws=ws,
        client=client,
        experiment_id=experiment_id,
        first=first,
        second=second,
        after_first=after_first,
        after_second=after_second,
        parent_after_second=parent_after_second,
        third=third,
        after_third=after_third,
        versions_after_first=versions_after_first,
        workers=workers,
    )


def children(scenario) -> dict[str, object]:
    """Child runs by trial label (t00, t01, ...)."""
    from flows.sweep.flow import child_runs

    runs = child_runs(scenario.client, scenario.experiment_id, scenario.first["parent_run_id"])
    first = [r for r in runs if r.info.run_id in scenario.after_first]
    return {r.info.run_name.rsplit("-", 1)[-1]: r for r in first}


def test_all_trials_are_child_runs_with_the_same_keys(scenario) -> None:
    runs = children(scenario)
    assert sorted(runs) == ["t00", "t01", "t02"]
    parent_id = scenario.first["parent_run_id"]
    for label, run in runs.items():
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent_id
        assert tags["sweep.role"] == "trial" and tags["sweep.trial"] == str(int(label[1:]))
        assert tags["dvc.processed_md5"].endswith(".dir")
    assert len({r.data.tags["sweep.trial_key"] for r in runs.values()}) == 3
    # The experiment holds this sweep only: the parent and its children (three, plus the
    # failed trial's retry of the third run).
    assert len(scenario.client.search_runs([scenario.experiment_id])) == 1 + 3 + 1

    # One set of parameter names for every child (MLflow's compare view lines them up) ...
    param_keys = {frozenset(r.data.params) for r in runs.values()}
    assert len(param_keys) == 1
    assert {"model.latent_dim", "train.beta", "train.lr"} <= set(next(iter(param_keys)))
    assert [runs[t].data.params["model.latent_dim"] for t in ("t00", "t01", "t02")] == [
        "2",
        "8",
        "8",
    ]
    assert all(r.data.params["train.epochs"] == "1" for r in runs.values())
    # ... and one set of metric names for every finished child (system metrics aside: MLflow
    # samples them on a clock, so a shorter trial may have fewer).
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    metric_keys = {
        frozenset(k for k in r.data.metrics if not k.startswith("system/")) for r in finished
    }
    assert len(finished) == 2 and len(metric_keys) == 1
    assert {"val/best_neg_elbo", "test/neg_elbo", "test/nll_iwae", "val/neg_elbo"} <= set(
        next(iter(metric_keys))
    )

    # The trials ran on the cluster's worker processes, which split the cores: one thread each
    # (a Dask worker of one thread starts with OMP_NUM_THREADS=1, which torch follows).
    used = {r.data.tags["sweep.worker"] for r in runs.values()}
    assert used <= scenario.workers, (used, scenario.workers)
    assert all(r.data.tags["device"] == "cpu" for r in runs.values())
    assert all(r.data.tags["torch.num_threads"] == "1" for r in runs.values())
    # Every finished child carries its logged model and its evaluation, so the winner can be
    # registered and gated from any machine.
    for run in finished:
        assert run.data.tags["sweep.model_uri"].startswith("models:/")
        names = {a.path for a in scenario.client.list_artifacts(run.info.run_id, "evaluation")}
        assert "evaluation/per_example_nll.npy" in names


def test_forced_failure_is_a_failed_child_and_the_others_complete(scenario) -> None:
    runs = children(scenario)
    failed = runs[FAILING]
    assert failed.info.status == "FAILED"
    assert failed.data.params["train.beta"] == "1.0e+38"
    assert failed.data.tags["failure.reason"].startswith("NonFiniteLossError: training loss")
    assert "sweep.complete" not in failed.data.tags
    for label in ("t00", "t01"):
        assert runs[label].info.status == "FINISHED"
        assert runs[label].data.tags["sweep.complete"] == "true"
    counts = scenario.first["counts"]
    assert counts == {"trials": 3, "finished": 2, "failed": 1, "reused": 0, "ran": 3}
    row = {r["trial"]: r for r in scenario.first["rows"]}[FAILING]
    assert row["status"] == "FAILED" and "NonFiniteLossError" in row["note"]
    assert row["val_neg_elbo"] is None


def test_parent_holds_the_definition_and_the_summary_table(scenario) -> None:
    client, parent_id = scenario.client, scenario.first["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in parent.data.tags
    tags = parent.data.tags
    assert tags["sweep.role"] == "parent" and tags["sweep.name"] == "tiny"
    assert tags["sweep.key"] == scenario.first["sweep_key"]
    assert tags["sweep.metric"] == "val_neg_elbo" and tags["sweep.goal"] == "min"
    params = parent.data.params
    assert params["sweep.method"] == "grid" and params["sweep.num_trials"] == "3"
    assert "model.latent_dim: 8" in params["sweep.space.variant"]
    assert params["train.epochs"] == "1"  # the base, with the -S overrides
    assert parent.data.metrics["sweep/finished"] == 2 and parent.data.metrics["sweep/failed"] == 1

    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"sweep", "sweep_summary.md"} <= artifacts
    local = Path(client.download_artifacts(parent_id, "sweep/sweep.yaml"))
    definition = yaml.safe_load(local.read_text())
    assert definition["sweep"] == SWEEP["sweep"]
    assert [t["label"] for t in definition["trials"]] == ["t00", "t01", "t02"]

    # The latest attempt's summary (the retry's, see the scenario); the first's is checked here.
    latest = Path(client.download_artifacts(parent_id, "sweep_summary.md")).read_text()
    assert latest == scenario.third["summary_markdown"]
    summary = scenario.first["summary_markdown"]
    assert scenario.first["table_markdown"] in summary and "**Winner: t0" in summary
    header = scenario.first["table_markdown"].splitlines()[0]
    rows = scenario.first["rows"]
    assert [r["trial"] for r in rows] == ["t00", "t01", "t02"]
    assert [r["status"] for r in rows] == ["FINISHED", "FINISHED", "FAILED"]
    (winner,) = [r for r in rows if r["run_id"] == scenario.first["best"]["run_id"]]
    assert winner["note"] == "best: mnist-vae v1, gate promote"
    for column in ("model.latent_dim", "train.beta", "val_neg_elbo", "test_nll_iwae", "sq_fd"):
        assert f"| {column} |" in header
    for row in rows:  # each row is read back from its child run, and is a line of the table
        assert f"| {row['trial']} |" in summary and (row["run_id"] in summary)
        run = client.get_run(row["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent_id
        assert run.info.run_name == f"tiny-{row['trial']}"
        if row["status"] == "FINISHED":
            assert row["val_neg_elbo"] == pytest.approx(run.data.metrics["val/best_neg_elbo"])
            assert row["test_nll_iwae"] == pytest.approx(run.data.metrics["test/nll_iwae"])


def test_best_trial_is_registered_and_gated(scenario) -> None:
    client, first = scenario.client, scenario.first
    finished = [r for r in first["rows"] if r["status"] == "FINISHED"]
    best = min(finished, key=lambda r: r["val_neg_elbo"])
    assert first["best"]["trial"] == best["trial"]
    assert first["best"]["run_id"] == best["run_id"]
    assert first["model"] == {"name": MODEL, "version": "1"}
    gate = first["gate"]
    assert gate["decision"] == "promote" and gate["applied"] is True  # first version, floor 1000
    assert gate["reason"].startswith("no champion yet")

    mv = client.get_model_version(MODEL, "1")
    assert mv.run_id == best["run_id"]
    tags = dict(mv.tags)
    assert tags["gate.decision"] == "promote" and tags["gate.mode"] == "enabled"
    assert tags["sweep.parent_run_id"] == first["parent_run_id"]
    assert tags["sweep.trial"] == str(int(best["trial"][1:]))
    assert tags["dvc.processed_md5"].endswith(".dir")
    assert float(tags["metric.val/best_neg_elbo"]) == pytest.approx(best["val_neg_elbo"], abs=1e-3)
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "1"

    parent_tags = client.get_run(first["parent_run_id"]).data.tags
    assert parent_tags["sweep.best_run_id"] == best["run_id"]
    assert parent_tags["sweep.model_version"] == "1"
    assert parent_tags["gate.decision"] == "promote"
    assert client.get_run(best["run_id"]).data.tags["sweep.winner"] == "true"


def test_rerun_reuses_finished_trials(scenario) -> None:
    # No new child run, and the existing ones untouched: same ids, statuses and times.
    assert scenario.after_second == scenario.after_first
    assert len(scenario.after_first) == 3
    # Nothing registered twice.
    versions = scenario.client.search_model_versions(f"name='{MODEL}'")
    assert len(versions) == len(scenario.versions_after_first) == 1
    parent = scenario.parent_after_second
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.attempt"] == "2"
    assert parent.data.metrics["sweep/ran"] == 0 and parent.data.metrics["sweep/reused"] == 3

    out = scenario.second["stdout"]
    assert scenario.second["code"] == 0
    assert "| trial | model.latent_dim | train.beta | status |" in out
    for run_id in scenario.after_first:
        assert run_id in out
    assert f"-> {MODEL} v1; gate promote" in out


def test_prefect_flow_runs_tasks_and_table_artifact(scenario) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterName,
    )

    first_id = scenario.first["flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(first_id)
        assert client.read_flow(flow_run.flow_id).name == "vae-sweep"
        assert flow_run.state is not None and flow_run.state.is_completed()
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
        states = {t.name: t.state.type.value for t in tasks if t.name.startswith("trial-")}
        assert states == {"trial-t00": "COMPLETED", "trial-t01": "COMPLETED", "trial-t02": "FAILED"}
        names = [t.name.rsplit("-", 1)[0] for t in tasks]
        # The pipeline's own tasks did the work: three trainings, two evaluations.
        assert names.count("train_model") == 3 and names.count("evaluate") == 2
        assert names.count("fetch_data") == names.count("prepare_data") == 1
        assert names.count("register") == names.count("promote") == 1

        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))
        )
        by_key = {a.key: a for a in artifacts if a.key}
        summary = by_key["vae-sweep-summary"]
        assert summary.type == "markdown" and summary.data == scenario.first["summary_markdown"]

        # The resumed sweep submitted no trial; the retry submitted the failed one only.
        reruns = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["sweep-tiny"]))
        )
        assert len(reruns) == 3
        assert all(r.state is not None and r.state.is_completed() for r in reruns)
        second = [r for r in reruns if str(r.id) not in (first_id, scenario.third["flow_run_id"])]
        for run, expected in ((second[0], {}), (scenario.third["flow_run_id"], {"trial-t02"})):
            run_id = getattr(run, "id", run)
            tasks = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
            )
            assert {t.name for t in tasks if t.name.startswith("trial-")} == set(expected)
            assert len([t for t in tasks if t.name.startswith("train_model")]) == len(expected)


def test_retry_failed_runs_only_the_failed_trial_again(scenario) -> None:
    third = scenario.third
    assert third["parent_run_id"] == scenario.first["parent_run_id"]
    assert third["counts"] == {"trials": 3, "finished": 2, "failed": 1, "reused": 2, "ran": 1}
    new = set(scenario.after_third) - set(scenario.after_first)
    assert len(new) == 1
    (new_id,) = new
    name, status, _, _ = scenario.after_third[new_id]
    assert (name, status) == ("tiny-t02", "FAILED")
    # The finished trials (and the first failure, as history) are untouched.
    assert {k: scenario.after_third[k] for k in scenario.after_first} == scenario.after_first
    old_t02 = children(scenario)[FAILING]
    new_t02 = scenario.client.get_run(new_id)
    assert new_t02.data.tags["sweep.trial_key"] == old_t02.data.tags["sweep.trial_key"]
    rows = {r["trial"]: r for r in third["rows"]}
    assert rows[FAILING]["run_id"] == new_id and rows[FAILING]["status"] == "FAILED"
    assert rows["t00"]["reused"] and rows["t01"]["reused"]
    # Same winner: not registered again, the earlier gate decision stands.
    assert third["model"] == {"name": MODEL, "version": "1"}
    assert third["gate"]["from_earlier_attempt"] is True
    assert len(scenario.client.search_model_versions(f"name='{MODEL}'")) == 1
