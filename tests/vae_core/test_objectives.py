"""The ELBO against hand-computed numbers (the IWAE bound is tested in test_likelihood.py)."""

import math

import pytest
import torch

from vae_core.models import VAEConfig, build_vae
from vae_core.models.likelihoods import continuous_bernoulli_log_prob
from vae_core.objectives import beta_at, gaussian_kl


def elbo_terms(model, x):
    return model.elbo_terms(x, torch.randn(len(x), model.noise_dim))


def _constant_vae(mu: float, logvar: float, logit: float, latent_dim: int = 2):
    """A VAE whose q(z|x) and p(x|z) ignore their inputs, so its ELBO has a closed form."""
    model = build_vae(VAEConfig(hidden_sizes=[8], latent_dim=latent_dim))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.encoder.head.bias[:latent_dim] = mu
        model.encoder.head.bias[latent_dim:] = logvar
        model.decoder.net[-1].bias.fill_(logit)
    return model


def test_kl_matches_hand_computation():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # dim 1: 0.5 * (1 + 1 - 1 - 0) = 0.5; dim 2: 0.5 * (0 + 2 - 1 - ln 2)
    expected_first = 0.5 + 0.5 * (1.0 - math.log(2.0))
    assert gaussian_kl(mu, logvar).tolist() == pytest.approx([expected_first, 0.0])


def test_elbo_matches_hand_computation():
    model = _constant_vae(mu=1.0, logvar=0.0, logit=0.0)
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    terms = elbo_terms(model, x)
    # Every pixel has p = sigmoid(0) = 1/2 whatever its value: 784 * ln 2 nats per image.
    assert terms.log_px_z.tolist() == pytest.approx([-784 * math.log(2.0)] * 4, rel=1e-6)
    # Two latent dimensions with mu = 1, sigma = 1: KL = 2 * 0.5 * 1 = 1 nat.
    assert terms.kl.tolist() == pytest.approx([1.0] * 4, rel=1e-6)
    assert terms.elbo.tolist() == pytest.approx([-784 * math.log(2.0) - 1.0] * 4, rel=1e-6)


def test_elbo_is_a_sum_over_pixels_not_a_mean():
    model = _constant_vae(mu=0.0, logvar=0.0, logit=2.0)
    x = torch.ones(1, 1, 28, 28)
    per_pixel = -math.log1p(math.exp(-2.0))  # log sigmoid(2)
    assert elbo_terms(model, x).log_px_z.item() == pytest.approx(784 * per_pixel, rel=1e-5)


@pytest.mark.parametrize("logit", [-6.0, -0.3, 0.0, 1e-4, 2.5])
def test_continuous_bernoulli_is_normalized(logit):
    """The density integrates to one over [0, 1], for logits on both sides of 0 and near it."""
    grid = torch.linspace(0.0, 1.0, 20001)
    x = grid.view(-1, 1)
    logits = torch.full_like(x, logit)
    density = continuous_bernoulli_log_prob(x, logits).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-4)


def test_beta_warmup_ramps_linearly_to_beta():
    # From 0 at the first epoch (as params.yaml says) to beta after the warm-up epochs.
    assert [beta_at(e, 1.0, 3) for e in range(5)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert beta_at(0, 0.5, 0) == 0.5
