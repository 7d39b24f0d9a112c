"""The sweep's definition and plan, without running anything: the sweep file, the trial grid
and random draws, refused definitions, trial keys, what a rerun reuses, the task runners (the
sweep itself runs in test_sweep)."""

import json
import math

import pytest
import yaml
from helpers import REPO_ROOT
from prefect.task_runners import ThreadPoolTaskRunner
from prefect_dask import DaskTaskRunner

from flows.params import Params, load_params
from flows.sweep import SweepError, load_sweep, parse_sweep
from flows.sweep.flow import local_cluster_kwargs, run_sweep, task_runner
from flows.sweep.trials import expand_trials, plan_trials, sweep_key, trial_key, with_keys


@pytest.fixture(scope="module")
def base() -> Params:
    return load_params(REPO_ROOT / "params.yaml")


def test_repo_sweep_file_is_valid(base) -> None:
    spec = load_sweep(REPO_ROOT / "sweep.yaml")
    trials = expand_trials(spec, base)
    assert spec.method == "grid" and spec.metric == "val/best_neg_elbo"
    assert len(trials) == math.prod(len(c) for c in spec.parameters.values()) >= 2
    assert all(set(t.overrides) == set(spec.parameters) for t in trials)


def test_grid_with_a_group_sets_keys_together(base) -> None:
    spec = parse_sweep(
        yaml.safe_load("""
        parameters:
          model.latent_dim: [10, 20]
          likelihood:
            - {model.likelihood: bernoulli, train.data_variant: binarized}
            - {model.likelihood: continuous_bernoulli, train.data_variant: continuous}
        """)
    )
    trials = expand_trials(spec, base)
    assert len(trials) == 4
    pairs = {(t.params.model.likelihood, t.params.train.data_variant) for t in trials}
    assert pairs == {("bernoulli", "binarized"), ("continuous_bernoulli", "continuous")}
    assert [t.params.model.latent_dim for t in trials] == [10, 10, 20, 20]
    assert all(t.params.data == base.data for t in trials)
    assert all(t.params.train.lr == base.train.lr for t in trials)


def test_random_search_is_seeded_and_draws_distinct_trials(base) -> None:
    definition = yaml.safe_load("""
        method: random
        num_trials: 6
        seed: 3
        parameters:
          train.lr: {log_uniform: [0.0001, 0.01]}
          model.latent_dim: {int_uniform: [2, 64]}
          model.architecture: [mlp, conv]
        """)
    first = expand_trials(parse_sweep(definition), base)
    again = expand_trials(parse_sweep(definition), base)
    assert [t.overrides for t in first] == [t.overrides for t in again]
    assert len({json.dumps(t.overrides, sort_keys=True) for t in first}) == 6
    assert all(0.0001 <= t.params.train.lr <= 0.01 for t in first)
    other = expand_trials(parse_sweep(definition | {"seed": 4}), base)
    assert [t.overrides for t in other] != [t.overrides for t in first]


LR = "parameters: {train.lr: [0.001]}"


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ("parameters: {model.latent_dimm: [2]}", "did you mean 'model.latent_dim'"),
        ("parameters: {data.val_size: [100, 200]}", "cannot vary within a sweep"),
        ("parameters: {train.lr: [0.001, 0.001]}", "more than once"),
        ("parameters: {train.lr: {log_uniform: [0.001, 0.01]}}", "need method random"),
        (f"{{method: random, {LR}}}", "needs num_trials"),
        (f"{{metric: val_elbo, {LR}}}", "did you mean"),
        (f"{{metric: test/nll_iwae, {LR}}}", "measured on the test set, which is only reported"),
        (f"{{metric: sq_fd, {LR}}}", "expected one of val/best_neg_elbo"),
        ("parameters: {train.beta: [1.0], g: [{train.beta: 2.0}]}", "set by both"),
        ("parameters: {g: [{train.beta: 2.0}, {train.lr: 0.1}]}", "the same keys"),
        ("parametres: {train.lr: [0.001]}", "did you mean 'parameters'"),
    ],
)
def test_bad_sweep_definitions_are_refused(definition: str, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        parse_sweep(yaml.safe_load(definition))


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
    expected = {0: ("done", "r0"), 1: ("keep-failed", "r1"), 5: ("new", None)}
    expected |= {i: ("resume", f"r{i}") for i in (2, 3, 4)}
    assert plan_trials(t, existing) == expected
    assert plan_trials(t, existing, retry_failed=True)[1] == ("new", None)


def test_task_runners() -> None:
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


def test_a_trial_value_outside_the_schema_is_refused_before_prefect_starts(tmp_path) -> None:
    (tmp_path / "params.yaml").write_bytes((REPO_ROOT / "params.yaml").read_bytes())
    (tmp_path / "bad.yaml").write_text("sweep:\n  parameters: {train.lr: [0.001, 2.0]}\n")
    with pytest.raises(SweepError, match=r"trial 1 \(train.lr=2.0\).*train.lr = 2.0"):
        run_sweep("bad.yaml", workdir=str(tmp_path))
    assert not (tmp_path / "mlflow.db").exists()
