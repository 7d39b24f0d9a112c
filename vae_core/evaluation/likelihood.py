"""Likelihood figures of a trained VAE: the test -ELBO, the IWAE estimate of -log p(x), bits per
dimension and active latent units.

Every function here takes any model with the VAE's duck type: `encode(x) -> (mu, logvar)`,
`decode(z) -> decoder output` and `log_likelihood(x, decoder_output) -> (B,)`. That is what lets
the tests check the IWAE estimator against a linear-Gaussian model whose log p(x) is exact.

The IWAE noise is seeded per test example, from (seed, index of the example in the test set):
the per-example estimate then does not depend on the batch size, the chunk size or the subset
it was evaluated in, and two models compared example by example (the promotion gate) see the
same standard-normal draws, which lowers the variance of their difference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vae_core.objectives import dataset_elbo

IMAGE_DIMS = 28 * 28
ACTIVE_UNIT_THRESHOLD = 0.01  # Burda et al. (2015), section 5.2


def model_device(model: nn.Module) -> torch.device:
    """Evaluation runs where the model's weights live."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


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


def example_seed(seed: int, index: int) -> int:
    """The seed of one test example's importance samples, in [0, 2^32).

    torch's CPU generator keeps only 32 bits of a seed, so (seed, index) is folded into 32 bits:
    for a given seed every index below 2^32 gets its own value, and seeds less than about 4000
    apart share none for indices below 10^6.
    """
    return (int(seed) * 1_000_003 + int(index)) % (1 << 32)


def _default_max_rows(device: torch.device) -> int:
    # One decoded row of a 784-pixel model costs about 12 KB in flight (logits, targets, loss).
    return 1 << 18 if device.type == "cuda" else 1 << 14


def iwae_log_likelihood(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    indices: np.ndarray | torch.Tensor | None = None,
    batch_size: int | None = None,
    max_rows: int | None = None,
) -> np.ndarray:
    """IWAE estimate of log p(x) per example, log (1/k) sum_i p(x, z_i) / q(z_i | x), float64.

    The project's only implementation of the importance-weighted bound: evaluation, the
    promotion gate, the tests and the GPU check all call this one. A lower bound on log p(x)
    in expectation that tightens as k grows (Burda et al. 2015); k=1 is a one-sample ELBO.
    `indices` are the examples' positions in the full test set (they seed the noise, see the
    module docstring); by default 0..len(x)-1. Examples go through in batches and the k samples
    through the decoder in chunks of at most `max_rows` rows, so k=5000 fits in memory; the
    log-weights are kept in float64 and reduced with logsumexp.
    """
    if k < 1:
        raise ValueError(f"evaluate.iwae_k: expected an integer >= 1, found {k}")
    device = model_device(model)
    n = len(x)
    if indices is None:
        indices = np.arange(n, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) != n:
        raise ValueError(f"indices: expected {n} entries (one per example), found {len(indices)}")
    max_rows = max_rows or _default_max_rows(device)
    if batch_size is None:
        batch_size = max(1, min(n, max_rows // k if k < max_rows else 1, 1000))
    gen = torch.Generator(device=device)
    out = np.empty(n, dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size].to(device)
            out[start : start + len(xb)] = (
                _iwae_batch(model, xb, k, indices[start : start + len(xb)], seed, gen, max_rows)
                .cpu()
                .numpy()
            )
    return out


def _iwae_batch(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    indices: np.ndarray,
    seed: int,
    gen: torch.Generator,
    max_rows: int,
) -> torch.Tensor:
    mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()
    batch, dim = mu.shape
    # Per-example noise from per-example seeds: independent of batching and chunking.
    eps = torch.empty(batch, k, dim, device=x.device)
    for row, index in enumerate(indices):
        gen.manual_seed(example_seed(seed, int(index)))
        eps[row] = torch.randn(k, dim, generator=gen, device=x.device)
    std = torch.exp(0.5 * logvar)
    log_w = torch.empty(batch, k, dtype=torch.float64, device=x.device)
    chunk = max(1, max_rows // batch)
    for s in range(0, k, chunk):
        e = eps[:, s : s + chunk]  # (B, c, D)
        c = e.shape[1]
        z = mu.unsqueeze(1) + std.unsqueeze(1) * e
        out = model.decode(z.reshape(batch * c, dim))
        x_rep = x.unsqueeze(1).expand(batch, c, *x.shape[1:]).reshape(batch * c, *x.shape[1:])
        log_px_z = model.log_likelihood(x_rep, out).view(batch, c).double()
        # log p(z) - log q(z|x); the log(2 pi) terms cancel and (z - mu) / sigma is exactly eps.
        log_pz_minus_qz = -0.5 * z.double().pow(2).sum(-1) + 0.5 * (
            e.double().pow(2) + logvar.double().unsqueeze(1)
        ).sum(-1)
        log_w[:, s : s + c] = log_px_z + log_pz_minus_qz
    return torch.logsumexp(log_w, dim=1) - math.log(k)


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
) -> IWAEResult:
    """-log p(x) by the IWAE estimator with k samples on a seeded subset of x (0 = all of x).

    Reported with k and the subset size because both change the figure: a smaller k gives a
    looser (higher) NLL, a subset adds sampling error (see IWAEResult.stderr).
    """
    indices = select_subset(len(x), test_size, seed)
    subset = x[torch.as_tensor(indices, device=x.device)]
    log_px = iwae_log_likelihood(
        model, subset, k, seed=seed, indices=indices, batch_size=batch_size, max_rows=max_rows
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
