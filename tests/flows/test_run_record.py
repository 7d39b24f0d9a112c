"""What a run logs as metrics: figures under their sections, never a setting, nothing twice."""

from __future__ import annotations

import pytest

from flows import run_record
from vae_core.config import TrainConfig

EPOCH = {
    "epoch": 3,
    "beta": 0.5,
    "lr": 0.001,
    "train_loss": 101.0,
    "train_neg_elbo": 100.0,
    "val_neg_elbo": 110.0,
    "val_recon": 80.0,
    "val_kl": 30.0,
    "epoch_seconds": 2.0,
    "samples_per_second": 2000.0,
}


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
    skip = run_record.repeated_epoch_keys(TrainConfig(**overrides))
    figures = run_record.epoch_figures(EPOCH, skip)
    assert {"train/neg_elbo", "val/neg_elbo", "val/recon", "val/kl"} <= set(figures)
    assert logged <= set(figures) and not (not_logged & set(figures))
    assert "epoch" not in figures and figures["val/neg_elbo"] == 110.0


def test_evaluation_keeps_figures_and_drops_settings_counts_and_labels() -> None:
    metrics = {
        "test_nll_iwae": 90.0,
        "test_nll_iwae_estimator": "IWAE bound with k=100",
        "iwae_k": 100,
        "seed": 0,
        "latent_dim": 20,
        "active_units": 17,
        "active_units_threshold": 0.01,
        "sq_fd": 12.0,
        "sq_ref_fd": 3.0,
        "sq_kid_subset_size": 500,
        "sq_label_frac_3": 0.1,
        "sq_ref_label_frac_3": 0.1,
        "holdout_nll_iwae": 91.0,
        "holdout_num_examples": 500,
        "eval_seconds": 4.0,
        "data_variant": "binarized",
    }
    assert run_record.evaluation_figures(metrics) == {
        "test/nll_iwae": 90.0,
        "test/active_units": 17.0,
        "sample_quality/fd": 12.0,
        "sample_quality/ref_fd": 3.0,
        "holdout/nll_iwae": 91.0,
        "time/eval_seconds": 4.0,
    }


def test_figure_names_refuse_what_is_not_a_figure() -> None:
    assert run_record.figure_name("sq_kid") == "sample_quality/kid"
    assert run_record.figure_name("test_neg_elbo") == "test/neg_elbo"
    with pytest.raises(KeyError, match="iwae_k: not a figure"):
        run_record.figure_name("iwae_k")


@pytest.mark.parametrize("by_iwae", [False, True], ids=["elbo-objective", "iwae-objective"])
def test_the_description_names_the_figure_that_chose_the_weights(by_iwae) -> None:
    train = {"best_epoch": 7, "epochs": 9, "best_val_neg_elbo": 95.0}
    if by_iwae:
        train["best_val_neg_iwae"] = 93.0
    figures = run_record.training_figures(train)
    assert ("val/best_neg_iwae" in figures) == by_iwae
    text = run_record.description(train, {"data_variant": "binarized"}, figures)
    rows = {line.split("`")[1]: line for line in text.splitlines() if line.startswith("| `")}
    chooser = "val/best_neg_iwae" if by_iwae else "val/best_neg_elbo"
    assert "chooses the weights" in rows[chooser] and "epoch (7 of 9)" in rows[chooser]
    assert [name for name, row in rows.items() if "chooses the weights" in row] == [chooser]
