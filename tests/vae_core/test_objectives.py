"""The ELBO against hand-computed numbers (the IWAE bound is tested in test_likelihood.py)."""

import math

import pytest
import torch
import torch.nn.functional as F

from vae_core.models import VAEConfig, build_vae
from vae_core.models.likelihoods import bernoulli_log_prob, continuous_bernoulli_log_prob
from vae_core.objectives import beta_at, gaussian_kl


def elbo_terms(model, x):
    return model.elbo_terms(x, torch.randn(len(x), model.noise_dim))  # constant layers: any eps


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


def test_kl_and_elbo_match_hand_computation_summed_over_pixels():
    mu = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logvar = torch.tensor([[0.0, math.log(2.0)], [0.0, 0.0]])
    # dim 1: 0.5 * (1 + 1 - 1 - 0) = 0.5; dim 2: 0.5 * (0 + 2 - 1 - ln 2)
    expected_first = 0.5 + 0.5 * (1.0 - math.log(2.0))
    assert gaussian_kl(mu, logvar).tolist() == pytest.approx([expected_first, 0.0])
    model = _constant_vae(mu=1.0, logvar=0.0, logit=0.0)
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    terms = elbo_terms(model, x)
    # Every pixel has p = sigmoid(0) = 1/2 whatever its value: 784 * ln 2 nats per image.
    assert terms.log_px_z.tolist() == pytest.approx([-784 * math.log(2.0)] * 4, rel=1e-6)
    # Two latent dimensions with mu = 1, sigma = 1: KL = 2 * 0.5 * 1 = 1 nat.
    assert terms.kl.tolist() == pytest.approx([1.0] * 4, rel=1e-6)
    assert terms.elbo.tolist() == pytest.approx([-784 * math.log(2.0) - 1.0] * 4, rel=1e-6)
    # A sum over the pixels, not a mean: log sigmoid(2) for each of 784 lit pixels.
    lit = elbo_terms(_constant_vae(mu=0.0, logvar=0.0, logit=2.0), torch.ones(1, 1, 28, 28))
    assert lit.log_px_z.item() == pytest.approx(784 * -math.log1p(math.exp(-2.0)), rel=1e-5)
    # The KL warm-up weight: from 0 at the first epoch (as params.yaml says) to beta.
    assert [beta_at(e, 1.0, 3) for e in range(5)] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0, 1.0])
    assert beta_at(0, 0.5, 0) == 0.5


@pytest.mark.parametrize("grey", [False, True], ids=["binary", "grey"])
def test_bernoulli_log_prob_and_its_gradient_match_torch_in_float64(grey):
    """The hand-fused log-probability against torch's own loss computed in float64, on logits
    from -60 to 60 (where a careless softplus overflows or loses the small term). Grey images
    require grad too: d/dx of x l - softplus(l) is l."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 1, 28, 28, generator=gen) * 8.0
    logits[0].view(-1)[:200] = torch.linspace(-60.0, 60.0, 200)
    x = torch.rand(logits.shape, generator=gen)
    x = x.requires_grad_() if grey else (x < 0.4).float()
    weights = torch.rand(16, generator=gen)  # a gradient that differs per example

    ours_logits = logits.clone().requires_grad_()
    ours = bernoulli_log_prob(x, ours_logits)
    (ours * weights).sum().backward()

    ref_logits = logits.double().requires_grad_()
    bce = F.binary_cross_entropy_with_logits(ref_logits, x.detach().double(), reduction="none")
    ref = -bce.flatten(1).sum(1)
    (ref * weights.double()).sum().backward()

    assert ours.dtype == torch.float32
    assert torch.allclose(ours.double(), ref.detach(), rtol=0, atol=2e-3)
    assert torch.allclose(ours_logits.grad.double(), ref_logits.grad, rtol=0, atol=1e-6)
    if grey:
        assert torch.allclose(x.grad, logits * weights.view(-1, 1, 1, 1))


@pytest.mark.parametrize("logit", [-6.0, -0.3, 0.0, 1e-4, 2.5])
def test_continuous_bernoulli_is_normalized(logit):
    """The density integrates to one over [0, 1], for logits on both sides of 0 and near it."""
    grid = torch.linspace(0.0, 1.0, 20001)
    x = grid.view(-1, 1)
    logits = torch.full_like(x, logit)
    density = continuous_bernoulli_log_prob(x, logits).exp()
    assert torch.trapezoid(density, grid).item() == pytest.approx(1.0, abs=1e-4)
