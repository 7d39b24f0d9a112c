"""The ELBO per example, in nats, and the training loss built on it.

Sums over pixels and latent dimensions (never means): a mean over pixels silently rescales the
reconstruction term and turns the objective into a beta-VAE. The importance-weighted (IWAE)
bound lives in one place, `vae_core.evaluation.likelihood.iwae_log_likelihood`, whose
per-example seeding makes it reproducible across batch and chunk sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vae_core.models.vae import VAE


@dataclass(frozen=True)
class ElboTerms:
    """Per-example terms of the ELBO; each has shape (B,) and is in nats."""

    log_px_z: torch.Tensor  # E_q[log p(x|z)], one-sample estimate
    kl: torch.Tensor  # KL(q(z|x) || N(0, I)), analytic

    @property
    def elbo(self) -> torch.Tensor:
        return self.log_px_z - self.kl


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per example, summed over latent dimensions."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def elbo_terms(model: VAE, x: torch.Tensor, generator: torch.Generator | None = None) -> ElboTerms:
    """One-sample reparameterized ELBO terms for a batch x of shape (B, 1, 28, 28)."""
    mu, logvar = model.encode(x)
    z = model.reparameterize(mu, logvar, generator)
    return ElboTerms(log_px_z=model.log_likelihood(x, model.decode(z)), kl=gaussian_kl(mu, logvar))


def beta_at(epoch: int, beta: float, warmup_epochs: int) -> float:
    """KL weight for a (0-based) epoch: a linear ramp from 0 at the first epoch to beta after
    ``warmup_epochs`` epochs (as params.yaml says), then beta.

    A weight other than 1 no longer gives the ELBO; evaluation always uses the unweighted bound.
    """
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, epoch / warmup_epochs)


def training_loss(
    model: VAE, x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ElboTerms]:
    """Mean over the batch of -(log p(x|z) - beta * KL); returns the loss and the terms."""
    terms = elbo_terms(model, x, generator)
    loss = -(terms.log_px_z - beta * terms.kl).mean()
    return loss, terms


@torch.no_grad()
def dataset_elbo(
    model: VAE,
    x: torch.Tensor,
    batch_size: int = 10_000,
    generator: torch.Generator | None = None,
) -> ElboTerms:
    """ELBO terms for every example of x, evaluated in large batches without gradients."""
    parts = [
        elbo_terms(model, x[i : i + batch_size], generator) for i in range(0, len(x), batch_size)
    ]
    return ElboTerms(
        log_px_z=torch.cat([p.log_px_z for p in parts]), kl=torch.cat([p.kl for p in parts])
    )
