"""The training objectives, per example and in nats: the ELBO and the IWAE bound.

Sums over pixels and latent dimensions (never means): a mean over pixels silently rescales the
reconstruction term and turns the objective into a beta-VAE. The noise eps is an argument, drawn
by the caller: the trainer draws it outside a compiled loss (torch.compile cannot trace a
seeded `randn`), and evaluation seeds it per example
(`vae_core.estimators.iwae_log_likelihood`, the bound as reported).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vae_core.models.gaussian import ElboTerms, gaussian_kl

__all__ = [
    "ElboTerms",
    "beta_at",
    "dataset_elbo",
    "draw_noise",
    "gaussian_kl",
    "iwae_bound",
    "training_loss",
]


def draw_noise(
    model: nn.Module, batch: int, k: int, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Standard-normal noise for k samples of each of `batch` images, shape (batch, k, dim)."""
    return torch.randn(
        (batch, k, model.noise_dim), device=device, dtype=torch.float32, generator=generator
    )


def _log_mean_weight(
    log_px_z: torch.Tensor, log_prior_minus_q: torch.Tensor, beta: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """log (1/k) sum_i w_i over the last dimension, log w_i = log p(x|z_i) + beta (log p(z_i)
    - log q(z_i|x)). beta = 1 is Burda's bound; below 1 it is the warm-up's tempered version,
    no longer a bound on log p(x)."""
    log_w = log_px_z.float() + beta * log_prior_minus_q.float()
    return torch.logsumexp(log_w, dim=-1) - math.log(log_w.shape[-1])


def iwae_bound(model: nn.Module, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The IWAE bound per example with k samples; eps has shape (B, k, noise_dim)."""
    return _log_mean_weight(*model.log_weight_terms(x, eps))


def beta_at(epoch: int, beta: float, warmup_epochs: int) -> float:
    """KL weight for a (0-based) epoch: a linear ramp from 0 at the first epoch to beta after
    ``warmup_epochs`` epochs (as params.yaml says), then beta.

    A weight other than 1 no longer gives the ELBO; evaluation always uses the unweighted bound.
    """
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch / warmup_epochs)


def training_loss(
    model: nn.Module,
    x: torch.Tensor,
    eps: torch.Tensor,
    beta: float | torch.Tensor = 1.0,
    objective: str = "elbo",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch mean of the negated objective, and each example's unweighted bound (nats).

    ``elbo``: eps is (B, noise_dim), one sample, -(log p(x|z) - beta KL). ``iwae``: eps is
    (B, k, noise_dim), the importance-weighted bound with k samples (k=1 is the ELBO without
    the analytic KL). The trainer passes beta as a 0-dim tensor: a compiled loss then serves
    every KL weight of a warm-up with one graph (a Python float is guarded on, and 0 and 1
    are specialised).
    """
    if objective == "iwae":
        log_px_z, log_prior_minus_q = model.log_weight_terms(x, eps)
        tempered = _log_mean_weight(log_px_z, log_prior_minus_q, beta)
        untempered = isinstance(beta, float | int) and beta == 1.0
        bound = tempered if untempered else _log_mean_weight(log_px_z, log_prior_minus_q)
        return -tempered.mean(), bound.detach()
    terms = model.elbo_terms(x, eps)
    loss = -(terms.log_px_z - beta * terms.kl).mean()
    return loss, terms.elbo.detach()


@torch.no_grad()
def dataset_elbo(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 10_000,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """One-sample ELBO terms for every example of x, in large batches without gradients."""
    parts = []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        eps = draw_noise(model, len(xb), 1, xb.device, generator).squeeze(1)
        parts.append(model.elbo_terms(xb, eps))
    return ElboTerms(
        log_px_z=torch.cat([p.log_px_z for p in parts]), kl=torch.cat([p.kl for p in parts])
    )
