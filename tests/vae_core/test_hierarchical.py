"""Burda's two-stochastic-layer VAE: its shapes and its log-weights against
torch.distributions (its shapes and ranges, bounds and pickle-free rebuild are tested with the
one-layer models in test_models.py, test_likelihood.py and test_atomic.py)."""

import torch
from helpers import TWO_LAYER
from torch.distributions import Bernoulli, Normal

from vae_core.config import VAEConfig
from vae_core.models.factory import build_vae
from vae_core.models.hierarchical import TwoLayerVAE


def test_build_vae_gives_the_two_layer_model_with_burdas_shapes():
    burda = VAEConfig(
        architecture="mlp2", hidden_sizes=[200, 200], latent_dim=100, activation="tanh"
    )
    model = build_vae(burda, seed=0)
    assert isinstance(model, TwoLayerVAE)
    assert model.noise_dim == 150 and model.latent_dim == 50
    linear = [m for m in model.q_z1.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(784, 200), (200, 200), (200, 200)]
    linear = [m for m in model.p_x.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(100, 200), (200, 200), (200, 784)]


def _log_normal(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)


def test_log_weights_match_torch_distributions():
    model = build_vae(TWO_LAYER, seed=0).eval()
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(0))
    eps = torch.randn(4, 5, model.noise_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        log_px_z, log_prior_minus_q = model.log_weight_terms(x, eps)
        mu1, logvar1 = model.q_z1(x)
        z1 = mu1.unsqueeze(1) + (0.5 * logvar1).exp().unsqueeze(1) * eps[..., :6]
        mu2, logvar2 = (t.view(4, 5, 3) for t in model.q_z2(z1.reshape(20, 6)))
        z2 = mu2 + (0.5 * logvar2).exp() * eps[..., 6:]
        pmu1, plogvar1 = (t.view(4, 5, 6) for t in model.p_z1(z2.reshape(20, 3)))
        logits = model.p_x(z1)
        expected_px = Bernoulli(logits=logits).log_prob(x.flatten(1).unsqueeze(1)).sum(-1)
        log_p = _log_normal(z1, pmu1, plogvar1) + Normal(0, 1).log_prob(z2).sum(-1)
        log_q = _log_normal(z1, mu1.unsqueeze(1), logvar1.unsqueeze(1))
        log_q = log_q + _log_normal(z2, mu2, logvar2)
    torch.testing.assert_close(log_px_z, expected_px, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(log_prior_minus_q, log_p - log_q, rtol=1e-5, atol=1e-3)
