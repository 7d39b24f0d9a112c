"""Diagonal Gaussians in nats: the KL to N(0, I), log-densities, and the per-example ELBO terms.

Kept apart from the models so that every model (one stochastic layer or two) and the objectives
share one definition of each term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# exp(+-10) bounds the variance to [4.5e-5, 2.2e4]: wide enough never to bind on a healthy
# model, tight enough that exp(logvar) cannot overflow and NaN the loss.
LOGVAR_MIN, LOGVAR_MAX = -10.0, 10.0


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """z = mu + sigma * eps: the sample is differentiable in mu and sigma.

    In float32 (or wider) whatever the autocast: a bf16 eps and z would add noise of their own
    to the sample the bound is estimated from.
    """
    dtype = torch.promote_types(mu.dtype, torch.float32)
    return mu.to(dtype) + torch.exp(0.5 * logvar.to(dtype)) * eps.to(dtype)


@dataclass(frozen=True)
class ElboTerms:
    """Per-example terms of the ELBO; each has shape (B,) and is in nats."""

    log_px_z: torch.Tensor  # E_q[log p(x|z)], one-sample estimate
    kl: torch.Tensor  # KL(q(z|x) || p(z)): analytic where it exists, else a one-sample estimate

    @property
    def elbo(self) -> torch.Tensor:
        return self.log_px_z - self.kl


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per example, summed over the last dimension."""
    mu, logvar = mu.float(), logvar.float()
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z | mu, diag(exp(logvar))), summed over the last dimension."""
    return (
        -0.5 * ((z - mu).pow(2) * torch.exp(-logvar) + logvar).sum(-1) - _HALF_LOG_2PI * z.shape[-1]
    )


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    """log N(z | 0, I), summed over the last dimension."""
    return -0.5 * z.pow(2).sum(-1) - _HALF_LOG_2PI * z.shape[-1]
