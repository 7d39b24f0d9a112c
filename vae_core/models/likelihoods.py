"""Decoder likelihoods p(x|z), evaluated from logits and summed over pixels.

Decoders output logits rather than probabilities so that every log-probability goes through
`binary_cross_entropy_with_logits`, which is numerically stable and safe under bf16 autocast.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vae_core.config import LIKELIHOODS


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x | sigmoid(logits)) summed over all non-batch dimensions, in nats.

    On binary x this is a proper log-likelihood. On grey levels in [0, 1] it is the summed
    binary cross-entropy of the design document, which is *not* a normalized density.
    """
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), x.float(), reduction="none")
    return -per_pixel.flatten(1).sum(dim=1)


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019).

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) for lambda != 1/2, and 2 at 1/2.
    Written in terms of the logit eta: (1 - 2 lambda) = -tanh(eta / 2), so
    C = eta / tanh(eta / 2) ... which is even in eta and tends to 2 as eta -> 0.
    We use a Taylor expansion near 0 to avoid 0/0.
    """
    eta = logits.float()
    small = eta.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(eta), eta)
    # log(eta / tanh(eta/2)) computed stably: for large |eta| tanh -> +-1.
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
    taylor = math.log(2.0) + eta.pow(2) / 12.0
    return torch.where(small, taylor, exact)


def continuous_bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log CB(x | lambda) summed over pixels: a normalized density on [0, 1]^D."""
    log_unnormalized = -F.binary_cross_entropy_with_logits(
        logits.float(), x.float(), reduction="none"
    )
    return (log_unnormalized + continuous_bernoulli_log_norm(logits)).flatten(1).sum(dim=1)


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the continuous Bernoulli, the image a user expects to see for a decoder output."""
    lam = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
    near_half = (lam - 0.5).abs() < 1e-3
    safe = torch.where(near_half, torch.full_like(lam, 0.25), lam)
    mean = safe / (2 * safe - 1) + 1 / (2 * torch.atanh(1 - 2 * safe))
    return torch.where(near_half, torch.full_like(lam, 0.5), mean)


def log_prob(likelihood: str, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Dispatch by likelihood name (one of vae_core.config.LIKELIHOODS)."""
    return LOG_PROBS[likelihood](x, logits)


LOG_PROBS = {"bernoulli": bernoulli_log_prob, "continuous_bernoulli": continuous_bernoulli_log_prob}
assert tuple(LOG_PROBS) == LIKELIHOODS, "vae_core.config.LIKELIHOODS names the implemented ones"


def mean_image(likelihood: str, logits: torch.Tensor) -> torch.Tensor:
    """The decoder distribution's mean, in [0, 1]."""
    if likelihood == "continuous_bernoulli":
        return continuous_bernoulli_mean(logits)
    return torch.sigmoid(logits.float())
