"""Drift of a batch's per-image NLLs from the reference: decisions, reasons, figures, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from flows.drift import DriftError, DriftThresholds, compare
from vae_core.errors import VaeError


@pytest.fixture
def reference() -> np.ndarray:
    return np.random.default_rng(0).normal(90.0, 10.0, 500)


@pytest.fixture
def batch() -> np.ndarray:
    """Drawn from the same distribution as the reference."""
    return np.random.default_rng(1).normal(90.0, 10.0, 10_000)


def test_same_distribution_is_no_drift(reference: np.ndarray, batch: np.ndarray) -> None:
    report = compare(reference, batch)
    assert report.decision == "no drift" and report.event_name == "vae.data.no-drift"
    assert (report.n_reference, report.n_batch) == (500, 10_000)
    assert 0.0 < report.share_beyond_reference_p99 < 0.03
    assert report.mean_shift_ci_low < 0.0 < report.mean_shift_ci_high
    # Both samples resampled: width ~ 2 * 1.96 * sqrt(10**2 / 500 + 10**2 / 10_000) = 1.80.
    assert 1.5 < report.mean_shift_ci_high - report.mean_shift_ci_low < 2.2
    assert report.ks_p_value >= 0.01
    assert len(report.reasons) == 3  # every criterion says why it did not fire
    assert report.lines()[0] == "drift_decision no-drift"
    assert report.lines()[1:] == [f"{k} {v:.10g}" for k, v in report.figures().items()]


def test_shift_drifts_by_ks_and_mean_shift(reference: np.ndarray, batch: np.ndarray) -> None:
    report = compare(reference, batch + 30.0)
    assert report.decision == "drift" and report.event_name == "vae.data.drift"
    assert report.lines()[0] == "drift_decision drift"
    assert report.ks_p_value < 0.01
    assert 28.0 < report.mean_shift_ci_low < report.mean_shift_nats < report.mean_shift_ci_high
    assert report.reasons[0].startswith("KS test rejects")
    assert report.reasons[1].startswith("Mean NLL shift is +") and "is above" in report.reasons[1]


def test_outliers_drift_by_tail_share_alone(reference: np.ndarray, batch: np.ndarray) -> None:
    outliers = batch.copy()
    outliers[::10] = 400.0  # 10% far beyond anything in the reference; the bulk unchanged
    lenient = DriftThresholds(min_mean_shift_nats=1e6)  # the KS/mean-shift pair cannot fire
    report = compare(reference, outliers, lenient)
    assert report.decision == "drift"
    assert report.share_beyond_reference_p99 > 0.10
    assert len(report.reasons) == 1 and report.reasons[0].startswith("Tail share")
    assert "more than the 5.00% allowed" in report.reasons[0] and report.tail_p_value < 1e-10
    # One such image in a batch of ten is 10% too, but chance: the binomial test says so.
    few = compare(reference, np.r_[batch[:9], 400.0], lenient)
    assert few.share_beyond_reference_p99 == 0.1 and few.tail_p_value > 0.01
    assert few.decision == "no drift"


def test_half_of_the_pair_is_no_drift(reference: np.ndarray, batch: np.ndarray) -> None:
    """KS rejects a 2.5-nat shift, but the CI's low end is under 2 nats; a 3-nat shift whose CI
    clears 2 nats is no drift either when KS (at a tiny alpha) does not reject."""
    report = compare(reference, batch + 2.5)
    assert report.ks_p_value < 0.01 and report.mean_shift_ci_low < 2.0 < report.mean_shift_nats
    assert report.share_beyond_reference_p99 < 0.05 and report.decision == "no drift"
    report = compare(reference, batch + 3.0, DriftThresholds(alpha=1e-10))
    assert report.ks_p_value > 1e-10 and report.mean_shift_ci_low > 2.0
    assert report.decision == "no drift"


def test_figures_are_deterministic_for_a_seed(reference: np.ndarray, batch: np.ndarray) -> None:
    first, again = compare(reference, batch + 1.0), compare(reference, batch + 1.0)
    assert first.figures() == again.figures() and first.reasons == again.reasons
    other = compare(reference, batch + 1.0, DriftThresholds(seed=7)).figures()
    assert other["drift_mean_shift_ci_low"] != first.figures()["drift_mean_shift_ci_low"]
    assert other["drift_mean_shift_nats"] == first.figures()["drift_mean_shift_nats"]


def test_ks_matches_scipy_on_a_hand_example() -> None:
    reference, batch = np.array([1.0, 2.0, 3.0, 4.0, 5.0]), np.arange(3.0, 9.0)
    report = compare(reference, batch)
    # The empirical CDFs differ most at 5: 5/5 of the reference against 3/6 of the batch.
    assert report.ks_statistic == pytest.approx(0.5)
    assert report.ks_p_value == stats.ks_2samp(reference, batch).pvalue


@pytest.mark.parametrize(
    ("which", "bad", "found"),
    [
        ("reference", np.array([]), "found none"),
        ("batch", np.ones((2, 3)), "found shape (2, 3)"),
        ("batch", np.array([90.0, 91.0, np.nan]), "found 1 non-finite (first at index 2: nan)"),
        ("reference", np.array([np.inf, 90.0, -np.inf]), "found 2 non-finite"),
    ],
)
def test_bad_input_names_the_array(which: str, bad: np.ndarray, found: str) -> None:
    good = np.linspace(80.0, 100.0, 50)
    args = (bad, good) if which == "reference" else (good, bad)
    with pytest.raises(ValueError, match=rf"^{which}: expected .*") as caught:
        compare(*args)
    assert found in str(caught.value) and isinstance(caught.value, VaeError)


# fmt: off
BAD_THRESHOLDS = [("alpha", 0.0), ("alpha", 1.0), ("min_mean_shift_nats", -1.0),
                  ("max_tail_share", 1.5), ("bootstrap_samples", 0), ("bootstrap_samples", 2.5),
                  ("confidence", 1.0), ("seed", -1)]
# fmt: on


@pytest.mark.parametrize(("field", "value"), BAD_THRESHOLDS)
def test_thresholds_reject_out_of_range(field: str, value: float) -> None:
    with pytest.raises(DriftError, match=rf"^DriftThresholds\.{field}: expected .*, found {value}"):
        DriftThresholds(**{field: value})
