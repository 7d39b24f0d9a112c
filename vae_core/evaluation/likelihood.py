"""Likelihood figures of a trained VAE: the test -ELBO, the IWAE estimate of -log p(x), bits per
dimension and active latent units.

Every function here takes any model of the library's interface (`vae_core.models.vae`):
`noise_dim`, `log_weight_terms(x, eps)`, `elbo_terms(x, eps)` and `encode(x)`. That is what
lets the tests check the IWAE estimator against a linear-Gaussian model whose log p(x) is exact.
The estimator itself, `iwae_log_likelihood` (noise seeded per example), lives in
`vae_core.estimators`, where the trainer's validation also finds it; it is re-exported here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vae_core.estimators import iwae_log_likelihood, model_device
from vae_core.objectives import dataset_elbo

__all__ = [
    "ACTIVE_UNIT_THRESHOLD",
    "IMAGE_DIMS",
    "ElboSummary",
    "IWAEResult",
    "active_units",
    "bits_per_dim",
    "elbo_summary",
    "iwae_log_likelihood",
    "iwae_nll",
    "latent_means",
    "model_device",
    "select_subset",
]

IMAGE_DIMS = 28 * 28
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2015), section 5.2


def bits_per_dim(nats_per_image: float | np.ndarray, dims: int = IMAGE_DIMS) -> float | np.ndarray:
    """Nats per image -> bits per pixel: nats / (dims ln 2), the unit of the density literature."""
    return nats_per_image / (dims * math.log(2.0))


def select_subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """Indices of a seeded random subset of range(n_total), sorted; size 0 (or >= n) = all.

    Deterministic in (n_total, size, seed) alone, so two evaluations with the same settings score
    exactly the same test examples, on any machine.
    """
    if size < 0:
        raise ValueError(f"evaluate.iwae_test_size: expected an integer >= 0, found {size}")
    if size == 0 or size >= n_total:
        return np.arange(n_total, dtype=np.int64)
    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.randperm(n_total, generator=gen)[:size]
    return np.sort(chosen.numpy()).astype(np.int64)


@dataclass(frozen=True)
class ElboSummary:
    """Test -ELBO in nats per image and its two terms: -ELBO = recon + KL."""

    neg_elbo: float
    recon: float  # -E_q[log p(x|z)], one sample of z per image
    kl: float  # KL(q(z|x) || p(z)), analytic
    n: int

    @property
    def bits_per_dim(self) -> float:
        return float(bits_per_dim(self.neg_elbo))


def elbo_summary(
    model: nn.Module, x: torch.Tensor, seed: int = 0, batch_size: int = 10_000
) -> ElboSummary:
    """Mean -ELBO, reconstruction and KL over x (one z sample per image, seeded)."""
    device = model_device(model)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    with torch.inference_mode():
        terms = dataset_elbo(model, x.to(device), batch_size, gen)
        return ElboSummary(
            neg_elbo=float(-terms.elbo.double().mean()),
            recon=float(-terms.log_px_z.double().mean()),
            kl=float(terms.kl.double().mean()),
            n=len(x),
        )


@dataclass(frozen=True)
class IWAEResult:
    """Per-example IWAE -log p(x) on a test subset, with the subset's indices and settings."""

    nll: np.ndarray  # float64, nats per image, one entry per evaluated example
    indices: np.ndarray  # int64 positions in the test set
    k: int
    seed: int

    @property
    def mean(self) -> float:
        return float(self.nll.mean())

    @property
    def stderr(self) -> float:
        """Standard error of the mean over the evaluated examples (the subset's sampling error)."""
        n = len(self.nll)
        return float(self.nll.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def iwae_nll(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    *,
    test_size: int = 0,
    seed: int = 0,
    batch_size: int | None = None,
    max_rows: int | None = None,
    fast: bool = True,
    precision: str = "fp32",
) -> IWAEResult:
    """-log p(x) by the IWAE estimator with k samples on a seeded subset of x (0 = all of x).

    Reported with k and the subset size because both change the figure: a smaller k gives a
    looser (higher) NLL, a subset adds sampling error (see IWAEResult.stderr).
    """
    indices = select_subset(len(x), test_size, seed)
    subset = x[torch.as_tensor(indices, device=x.device)]
    log_px = iwae_log_likelihood(
        model,
        subset,
        k,
        seed=seed,
        indices=indices,
        batch_size=batch_size,
        max_rows=max_rows,
        fast=fast,
        precision=precision,
    )
    return IWAEResult(nll=-log_px, indices=indices, k=int(k), seed=int(seed))


def latent_means(model: nn.Module, x: torch.Tensor, batch_size: int = 10_000) -> torch.Tensor:
    """E_q[z | x] for every example of x, shape (N, latent_dim), float32 on the model's device."""
    device = model_device(model)
    with torch.inference_mode():
        parts = [
            model.encode(x[i : i + batch_size].to(device))[0].float()
            for i in range(0, len(x), batch_size)
        ]
    return torch.cat(parts)


def active_units(
    model: nn.Module,
    x: torch.Tensor,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
    batch_size: int = 10_000,
) -> tuple[int, np.ndarray]:
    """Count latent units u with Cov_x(E_q[z_u | x]) > threshold (Burda et al. 2015).

    A unit whose posterior mean does not move with x carries no information about x: it has
    collapsed onto the prior. Returns the count and every unit's variance (float64).
    """
    mu = latent_means(model, x, batch_size).double()
    variances = mu.var(dim=0, unbiased=True) if len(mu) > 1 else torch.zeros(mu.shape[1])
    variances = variances.cpu().numpy()
    return int((variances > threshold).sum()), variances
