"""`python3 -m experiments reproduce` (and `vae-pipeline reproduce`): the budget planner's
decisions, the table, and the command end to end on a small synthetic IDX folder with a real
SQLite MLflow store, or with none (no ../shared, no network). The command runs with a cheap
estimator (--test-k 20 on 60 images) and at most 2 epochs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import write_idx_folder

from experiments import cli
from experiments import reproduce as rp
from experiments.tracking import git_state

EXACT = {"overhead_s": 0.0, "safety": 0.0, "min_epochs": 1}  # round numbers in the planner


def test_rows_in_priority_order_and_the_schedule_length_agrees_with_vae_core() -> None:
    from vae_core.training.schedule import BURDA_EPOCHS as CORE

    assert rp.BURDA_EPOCHS == CORE
    assert [r.name for r in rp.ROWS][:3] == ["seed_mlp", "burda1_vae", "burda2_vae"]
    chosen = rp.select_rows("burda2_iwae5, seed_mlp")
    assert [r.name for r in chosen] == ["burda2_iwae5", "seed_mlp"]
    with pytest.raises(rp.ReproduceError, match="burda3_vae.*seed_mlp"):
        rp.select_rows("seed_mlp,burda3_vae")


def test_the_budget_is_poured_into_the_rows_in_priority_order_and_used_whole() -> None:
    costs = [rp.RowCost("a", epoch_s=10, eval_s=100), rp.RowCost("b", epoch_s=20, eval_s=100)]
    costs += [rp.RowCost("c", epoch_s=10, eval_s=5000), rp.RowCost("d", epoch_s=1, eval_s=1)]
    a, b, c, d = rp.plan_rows(costs, 1000, enough_epochs=50, **(EXACT | {"min_epochs": 5}))
    # a: eval + one overrun epoch = 110 s, then enough (50 epochs, 500 s); b: 120 s fixed and
    # the rest, 270 s: 13 epochs, its hard stop (and learning-rate decay) at the end of it.
    assert (a.epochs, a.reason) == (50, "50 epochs: enough (50)")
    assert a.max_minutes * 60 == pytest.approx(500)
    assert (b.epochs, b.max_minutes * 60) == (13, pytest.approx(270))
    assert b.reason == "13 epochs: the rest of the budget (4.5 min of training)"
    assert a.reserved_s + b.reserved_s == pytest.approx(1000)
    # c cannot reach the floor, and d, cheap as it is, may not jump the queue.
    assert not c.runs and "needs >= 84.3 min" in c.reason and "0 s left" in c.reason
    assert not d.runs and d.reason == "c did not reach the floor"


def test_a_faster_machine_never_costs_a_row_epochs_nor_its_place() -> None:
    # Seven rows like Burda's table on a CPU (epochs of 2-45 s, evaluations of 1-10 min),
    # 45 minutes, machines from as fast to 20x faster per epoch: every row that ran on the
    # slower one runs on the faster one, with at least as many epochs.
    import random

    rng = random.Random(0)
    for _ in range(50):
        costs = [
            rp.RowCost(f"r{i}", epoch_s=rng.uniform(2, 45), eval_s=rng.uniform(60, 600))
            for i in range(7)
        ]
        before = None
        for speed in (1.0, 1.05, 1.3, 1.7, 2.5, 4.0, 7.0, 12.0, 20.0):
            faster = [rp.RowCost(c.name, c.epoch_s / speed, c.eval_s) for c in costs]
            plans = rp.plan_rows(faster, 45 * 60)
            assert all(p.epochs >= rp.MIN_EPOCHS or not p.runs for p in plans)
            ran = [p.runs for p in plans]
            assert ran == sorted(ran, reverse=True)  # the rows that run come first
            if before is not None:
                for old, new in zip(before, plans, strict=True):
                    assert new.epochs >= old.epochs, (speed, old, new)
            before = plans


def test_what_fits_no_budget_the_floor_and_the_whole_burda_schedule() -> None:
    costs = [rp.RowCost("a", epoch_s=10, eval_s=100)]
    assert not rp.plan_rows(costs, 0)[0].runs and not rp.plan_rows(costs, -50)[0].runs
    # 100 + 5 + 10 (overrun) + 30 x 10 = 415 s for the floor of 30 epochs
    assert not rp.plan_rows(costs, 414, safety=0.0)[0].runs
    assert rp.plan_rows(costs, 416, safety=0.0)[0].epochs == rp.MIN_EPOCHS == 30
    # When it all fits: Burda's schedule, unless the epochs are capped (the floor with them).
    costs = [rp.RowCost("a", epoch_s=0.1, eval_s=10), rp.RowCost("b", epoch_s=0.2, eval_s=10)]
    full = rp.plan_rows(costs, 100_000, enough_epochs=rp.BURDA_EPOCHS)
    assert [(p.epochs, p.lr_schedule) for p in full] == [(rp.BURDA_EPOCHS, "burda")] * 2
    capped = rp.plan_rows(costs, 100_000, max_epochs=2)
    assert [(p.epochs, p.lr_schedule) for p in capped] == [(2, "exponential")] * 2


def test_train_config_follows_the_plan() -> None:
    costs = [rp.RowCost("burda1_iwae50", epoch_s=30, eval_s=600)]
    (plan,) = rp.plan_rows(costs, 3600)
    cfg = rp.train_config(rp.ROWS[5], plan, "cpu")
    assert (cfg.objective, cfg.iwae_k, cfg.lr_schedule) == ("iwae", 50, "exponential")
    assert cfg.epochs == plan.epochs
    assert (cfg.lr, cfg.lr * cfg.lr_final, cfg.recipe) == (2e-3, pytest.approx(2e-4), "budget")
    assert plan.epochs * 30 / 60 <= cfg.max_minutes < (plan.epochs + 1) * 30 / 60


def test_table_and_figures() -> None:
    ran = rp.RowResult(rp.ROWS[1], "ran", 12, 340.0, "cpu", 91.234, 0.31, "17")
    skipped = rp.RowResult(rp.ROWS[2], rp.NOT_RUN, note="needs more")
    table = rp.results_table([ran, skipped], 5000, 10_000)
    assert "| test NLL (k=5000, 10,000 images) | Burda 2015 | active units |" in table
    assert (
        "| burda1_vae | 784-200-200-50 tanh | ELBO | 12 | 340 | cpu | 91.23 ± 0.31 (fp32) |"
        in table
    )
    assert f"| {rp.NOT_RUN} | 85.33 | - |" in table
    best = {"burda1_vae_test_nll": 91.234, "best_test_nll": 91.234, "best_row": "burda1_vae"}
    assert rp.figures([ran, skipped]) == best
    nothing = rp.figures([skipped])
    assert math.isnan(nothing["best_test_nll"]) and nothing["best_row"] == "none"


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("digits")
    write_idx_folder(folder, n_train=300, n_test=60, learnable=True)
    return folder


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _reproduce(mnist_dir: Path, uri: str | None, out: Path, budget: str, rows: str) -> list[str]:
    return [
        "reproduce",
        *("--mnist-dir", str(mnist_dir), "--budget-minutes", budget, "--rows", rows),
        *(("--tracking-uri", uri) if uri else ()),
        *("--out", str(out), "--max-epochs", "2", "--test-k", "20", "--val-size", "100"),
    ]


@pytest.mark.slow  # trains two rows (the full-size networks) for two epochs
def test_rows_run_print_the_table_and_log_one_mlflow_run_each(
    mnist_dir: Path, tracking_uri: str, tmp_path: Path, capsys
) -> None:
    from mlflow import MlflowClient

    rc = cli.main(_reproduce(mnist_dir, tracking_uri, tmp_path, "10", "seed_mlp,burda2_iwae5"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "| test NLL (k=20, 60 images) | Burda 2015 | active units |" in out
    assert "| seed_mlp | 784-400-20 relu | ELBO | 2 |" in out
    assert "| burda2_iwae5 | 784-200-200-100-100-100-50 tanh (2 stoch.) | IWAE k=5 | 2 |" in out
    lines = dict(line.split(" ", 1) for line in out.splitlines() if line and line[0] != "|")
    nll = {row: float(lines[f"{row}_test_nll"]) for row in ("seed_mlp", "burda2_iwae5")}
    assert float(lines["best_test_nll"]) == min(nll.values())
    assert lines["best_row"] == min(nll, key=nll.get)
    assert (tmp_path / "table.md").read_text() in out

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("vae-reproduce")
    runs = {r.data.params["row"]: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"seed_mlp", "burda2_iwae5"}
    for row, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.metrics["test/nll_iwae"] == pytest.approx(nll[row], abs=1e-3)
        expected = {"test/nll_iwae_stderr", "train/epochs", "time/train_seconds", "val/neg_elbo"}
        assert expected <= set(run.data.metrics)
        assert run.data.metrics["val/best_neg_elbo"] > 0
        assert run.data.tags["data.variant"].startswith("binarized")
        assert run.data.tags["estimator"] == "IWAE k=20, 60 images (test set)"
        assert run.data.params["train.lr_schedule"] == "exponential"
    two_layer = runs["burda2_iwae5"].data
    assert two_layer.tags["reference.burda2015_nll"] == "83.89"
    assert {"test/active_units_z1", "test/active_units_z2"} <= set(two_layer.metrics)
    assert "test/active_units" in runs["seed_mlp"].data.metrics


def test_rows_that_do_not_fit_are_reported_and_not_logged(
    mnist_dir: Path, tracking_uri: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    from mlflow import MlflowClient

    from flows import cli as flows_cli

    rows = "burda1_vae,burda1_iwae50"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)  # vae-pipeline's default URI
    rc = flows_cli.main(_reproduce(mnist_dir, None, tmp_path, "0.001", rows))
    out = capsys.readouterr().out
    assert rc == 1 and out.count(rp.NOT_RUN) == 2 and "best_row none" in out  # none could run
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # no URI: the harness runs, says it does not log
    assert cli.main(_reproduce(mnist_dir, None, tmp_path, "0.001", rows)) == 1
    assert capsys.readouterr().err.count("not logging to MLflow: no tracking URI") == 1
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("vae-reproduce")
    logged = {r.data.params["row"] for r in client.search_runs([experiment.experiment_id])}
    assert not logged & set(rows.split(","))


def test_a_bad_mnist_dir_is_one_error_line_naming_the_folder(
    tmp_path: Path, tracking_uri: str, capsys
) -> None:
    missing = tmp_path / "no-mnist-here"
    rc = cli.main(_reproduce(missing, tracking_uri, tmp_path / "out", "1", "seed_mlp"))
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --mnist-dir {missing}: expected a folder holding the four")

    empty_ish = tmp_path / "half"
    empty_ish.mkdir()
    (empty_ish / "notes.txt").write_text("not MNIST")
    rc = cli.main(_reproduce(empty_ish, tracking_uri, tmp_path / "out", "1", "seed_mlp"))
    err = capsys.readouterr().err
    assert rc == 2 and f"--mnist-dir {empty_ish}" in err and "t10k-images-idx3-ubyte.gz" in err

    rc = cli.main(_reproduce(empty_ish, tracking_uri, tmp_path / "out", "1", "burda3"))
    assert rc == 2 and "unknown row burda3" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_git_state_is_unknown_without_git_or_a_repository(tmp_path: Path, monkeypatch) -> None:
    unknown = {"git.commit": "unknown", "git.dirty": "unknown"}
    assert git_state(tmp_path) == unknown  # not a repository
    monkeypatch.setenv("PATH", str(tmp_path))  # no git at all (a bare GPU machine)
    assert git_state(Path(__file__).parent) == unknown
