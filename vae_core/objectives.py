"""The ELBO and the importance-weighted (IWAE) bound, per example, in nats.

Both are sums over pixels and latent dimensions (never means): a mean over pixels silently
rescales the reconstruction term and turns the objective into a beta-VAE.
"""

from __future__ import annotations

import math
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
    """KL weight for a (0-based) epoch: a linear ramp from 1/(warmup+1) to beta.

    A weight other than 1 no longer gives the ELBO; evaluation always uses the unweighted bound.
    """
    if warmup_epochs <= 0:
        return beta
    return beta * min(1.0, (epoch + 1) / (warmup_epochs + 1))


def training_loss(
    model: VAE, x: torch.Tensor, beta: float = 1.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, ElboTerms]:
    """Mean over the batch of -(log p(x|z) - beta * KL); returns the loss and the terms."""
    terms = elbo_terms(model, x, generator)
    loss = -(terms.log_px_z - beta * terms.kl).mean()
    return loss, terms


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z | mu, diag(exp(logvar))) summed over the last dimension."""
    return -0.5 * (((z - mu).pow(2) / logvar.exp() + logvar + math.log(2 * math.pi)).sum(dim=-1))


@torch.no_grad()
def iwae_bound(
    model: VAE,
    x: torch.Tensor,
    k: int,
    chunk_size: int = 500,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The IWAE bound log (1/k) sum_i p(x, z_i) / q(z_i|x), per example, float64, shape (B,).

    With k=1 it is a one-sample ELBO; it tightens towards log p(x) as k grows. The k samples
    are drawn in chunks, and each chunk's log-weights are folded into a running log-sum-exp
    in float64, so k=5000 needs memory for only chunk_size samples at a time.
    """
    if k < 1:
        raise ValueError(f"evaluate.iwae_k: expected an integer >= 1, found {k}")
    mu, logvar = model.encode(x)
    mu, logvar = mu.float(), logvar.float()
    batch = x.shape[0]
    running = torch.full((batch,), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < k:
        n = min(chunk_size, k - done)
        eps = torch.randn((n, *mu.shape), device=mu.device, generator=generator)
        z = mu + torch.exp(0.5 * logvar) * eps  # (n, B, D)
        logits = model.decode(z.reshape(n * batch, -1))
        x_rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * batch, *x.shape[1:])
        log_px_z = model.log_likelihood(x_rep, logits).view(n, batch)
        log_pz = _log_normal(z, torch.zeros_like(z), torch.zeros_like(z))
        log_qz_x = _log_normal(z, mu, logvar)
        log_w = (log_px_z.float() + log_pz - log_qz_x).double()
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        done += n
    return running - math.log(k)


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
