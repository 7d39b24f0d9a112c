"""Data drift: compare a batch's per-image NLLs with those of the model's holdout images.

A VAE's per-image IWAE NLL (nats) is an anomaly score: images unlike the training data cost
more nats. The holdout NLLs kept when a version is registered are the reference; a batch
drifts when its NLLs are both distributed differently (two-sample KS test) and higher by a
margin that matters (bootstrap lower bound of the mean shift), or when too many of its images
lie in the reference's far tail, which catches a few gross outliers that barely move the mean.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
from scipy import stats

from vae_core.errors import VaeError

#: Bootstrap resamples are drawn in blocks of at most this many indices, to bound memory.
_BLOCK_ELEMENTS = 4_000_000


class DriftError(VaeError, ValueError):
    """The NLLs or thresholds given cannot be compared (empty, wrong shape, out of range)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class DriftThresholds:
    """When a batch counts as drifted; defaults suit batches of hundreds of images or more."""

    alpha: float = 0.01
    min_mean_shift_nats: float = 2.0
    max_tail_share: float = 0.05
    bootstrap_samples: int = 2000
    confidence: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("alpha", 0 < self.alpha < 1, "a number in (0, 1)"),
            ("min_mean_shift_nats", 0 <= self.min_mean_shift_nats < np.inf, "a finite number >= 0"),
            ("max_tail_share", 0 <= self.max_tail_share < 1, "a number in [0, 1)"),
            (
                "bootstrap_samples",
                _is_int(self.bootstrap_samples) and self.bootstrap_samples > 0,
                "an integer >= 1",
            ),
            ("confidence", 0 < self.confidence < 1, "a number in (0, 1)"),
            ("seed", _is_int(self.seed) and self.seed >= 0, "an integer >= 0"),
        )
        for name, ok, expected in checks:
            if not ok:
                found = getattr(self, name)
                raise DriftError(f"DriftThresholds.{name}: expected {expected}, found {found!r}")


@dataclass(frozen=True)
class DriftReport:
    """The decision on one batch, the sentences that justify it and the figures behind them."""

    decision: str  # "drift" or "no drift"
    reasons: tuple[str, ...]
    n_reference: int
    n_batch: int
    reference_mean_nll: float
    batch_mean_nll: float
    mean_shift_nats: float  # batch minus reference
    mean_shift_ci_low: float
    mean_shift_ci_high: float
    ks_statistic: float
    ks_p_value: float
    reference_p99: float
    share_beyond_reference_p99: float
    tail_p_value: float  # one-sided binomial test of that share against the 1% expected

    def figures(self) -> dict[str, float]:
        """Every numeric field as ``drift_<field>``, for metrics and tags."""
        return {
            f"drift_{f.name}": float(getattr(self, f.name))
            for f in fields(self)
            if f.name not in ("decision", "reasons")
        }

    def lines(self) -> list[str]:
        """``name value`` lines, decision first, for logs and text exports."""
        head = f"drift_decision {self.decision.replace(' ', '-')}"
        return [head] + [f"{name} {value:.10g}" for name, value in self.figures().items()]

    @property
    def event_name(self) -> str:
        return "vae.data.drift" if self.decision == "drift" else "vae.data.no-drift"


def _as_nlls(name: str, values: np.ndarray) -> np.ndarray:
    """values as a float64 1-D array of finite NLLs, or a DriftError naming the array."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise DriftError(f"{name}: expected a 1-D array of NLLs, found shape {array.shape}")
    if array.size == 0:
        raise DriftError(f"{name}: expected at least one per-image NLL, found none")
    bad = ~np.isfinite(array)
    if bad.any():
        raise DriftError(
            f"{name}: expected finite NLLs, found {int(bad.sum())} non-finite "
            f"(first at index {int(np.argmax(bad))}: {array[bad][0]})"
        )
    return array


def _bootstrap_shifts(
    reference: np.ndarray, batch: np.ndarray, samples: int, seed: int
) -> np.ndarray:
    """Mean shifts (batch minus reference) of `samples` independent resamples of each array."""
    rng = np.random.default_rng(seed)
    n_ref, n_batch = len(reference), len(batch)
    block = max(1, _BLOCK_ELEMENTS // max(n_ref, n_batch))
    out = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, block):
        b = min(block, samples - start)
        ref_means = reference[rng.integers(0, n_ref, size=(b, n_ref))].mean(axis=1)
        batch_means = batch[rng.integers(0, n_batch, size=(b, n_batch))].mean(axis=1)
        out[start : start + b] = batch_means - ref_means
    return out


def compare(
    reference: np.ndarray, batch: np.ndarray, thresholds: DriftThresholds = DriftThresholds()
) -> DriftReport:
    """Decide whether batch's NLLs have drifted from reference's (both nats per image).

    Drift iff (KS p-value < alpha and the mean shift's bootstrap CI lower bound exceeds
    min_mean_shift_nats) or the share of batch images above the reference's 99th percentile
    exceeds max_tail_share and, by a one-sided binomial test, the 1% expected (p < alpha).
    The KS test alone is not enough: on large batches it rejects shifts far too small to
    matter.
    """
    t = thresholds
    ref, new = _as_nlls("reference", reference), _as_nlls("batch", batch)
    shift = float(new.mean() - ref.mean())
    shifts = _bootstrap_shifts(ref, new, t.bootstrap_samples, t.seed)
    low_q = (1.0 - t.confidence) / 2.0
    ci_low, ci_high = (float(q) for q in np.quantile(shifts, [low_q, 1.0 - low_q]))
    ks = stats.ks_2samp(ref, new, alternative="two-sided")
    ks_stat, ks_p = float(ks.statistic), float(ks.pvalue)
    p99 = float(np.percentile(ref, 99))
    beyond = int(np.sum(new > p99))
    share = beyond / new.size
    # A small batch passes max_tail_share by chance (one image in ten is 10%): the share must
    # also be significantly above the 1% a batch like the reference puts there.
    tail_p = float(stats.binomtest(beyond, new.size, 0.01, alternative="greater").pvalue)

    ks_fired, shift_fired = ks_p < t.alpha, ci_low > t.min_mean_shift_nats
    tail_fired = share > t.max_tail_share and tail_p < t.alpha
    ks_text = (
        f"KS test {'rejects' if ks_fired else 'does not reject'} equal distributions (D = "
        f"{ks_stat:.4f}, p = {ks_p:.3g} {'<' if ks_fired else '>='} alpha {t.alpha})."
    )
    shift_text = (
        f"Mean NLL shift is {shift:+.3f} nats ({t.confidence:.0%} CI {ci_low:+.3f} to "
        f"{ci_high:+.3f}); its lower bound is {'above' if shift_fired else 'not above'} "
        f"the {t.min_mean_shift_nats} nats minimum."
    )
    tail_text = (
        f"Tail share: {share:.2%} of batch images lie above the reference's 99th percentile "
        f"({p99:.3f} nats): {'more than' if share > t.max_tail_share else 'at most'} the "
        f"{t.max_tail_share:.2%} allowed, binomial p = {tail_p:.3g} against 1% "
        f"({'<' if tail_p < t.alpha else '>='} alpha {t.alpha})."
    )
    # Only the criteria that fired justify drift; no drift needs all three explained.
    fired = (ks_text, shift_text) * (ks_fired and shift_fired) + (tail_text,) * tail_fired
    decision = "drift" if fired else "no drift"
    reasons = fired or (ks_text, shift_text, tail_text)
    return DriftReport(
        decision=decision,
        reasons=reasons,
        n_reference=int(ref.size),
        n_batch=int(new.size),
        reference_mean_nll=float(ref.mean()),
        batch_mean_nll=float(new.mean()),
        mean_shift_nats=shift,
        mean_shift_ci_low=ci_low,
        mean_shift_ci_high=ci_high,
        ks_statistic=ks_stat,
        ks_p_value=ks_p,
        reference_p99=p99,
        share_beyond_reference_p99=share,
        tail_p_value=tail_p,
    )
