"""Burda's two-stochastic-layer VAE: its log-weights against torch.distributions, its bounds,
and a pickle-free rebuild from its config."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, Normal

from vae_core.config import VAEConfig
from vae_core.evaluation.likelihood import iwae_log_likelihood
from vae_core.models.factory import build_vae
from vae_core.models.hierarchical import TwoLayerVAE
from vae_core.training.checkpoint import rebuild_vae, save_model

TINY = VAEConfig(
    architecture="mlp2",
    hidden_sizes=[32, 16],
    latent_dim=6,
    activation="tanh",
    top_hidden_sizes=[8],
    top_latent_dim=3,
)


def _x(n: int, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(
        torch.full((n, 1, 28, 28), 0.3), generator=torch.Generator().manual_seed(seed)
    )


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


def test_log_weights_match_torch_distributions():
    model = build_vae(TINY, seed=0).eval()
    x = _x(4)
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
        log_p = Normal(pmu1, (0.5 * plogvar1).exp()).log_prob(z1).sum(-1) + Normal(0, 1).log_prob(
            z2
        ).sum(-1)
        log_q = Normal(mu1.unsqueeze(1), (0.5 * logvar1).exp().unsqueeze(1)).log_prob(z1).sum(
            -1
        ) + Normal(mu2, (0.5 * logvar2).exp()).log_prob(z2).sum(-1)
    torch.testing.assert_close(log_px_z, expected_px, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(log_prior_minus_q, log_p - log_q, rtol=1e-5, atol=1e-3)


def test_the_iwae_estimate_tightens_with_k_and_the_elbo_is_its_k1_case():
    model = build_vae(TINY, seed=0).eval()
    x = _x(64)
    ll = {k: iwae_log_likelihood(model, x, k, seed=0).mean() for k in (1, 10, 200)}
    assert ll[1] < ll[10] < ll[200]
    with torch.no_grad():
        eps = torch.randn(64, model.noise_dim, generator=torch.Generator().manual_seed(2))
        elbo = model.elbo_terms(x, eps).elbo.double().mean().item()
    assert elbo == pytest.approx(ll[1], abs=5.0)  # two one-sample estimates of the same ELBO
    assert all(math.isfinite(v) for v in ll.values())


def test_sample_encode_decode_shapes():
    model = build_vae(TINY, seed=0).eval()
    x = _x(3)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 3)
    images = [
        model.decode(mu).sigmoid(),
        model.sample(5, torch.Generator().manual_seed(0)),
        model.reconstruct(x),
    ]
    assert [tuple(i.shape) for i in images] == [(3, 1, 28, 28), (5, 1, 28, 28), (3, 1, 28, 28)]
    assert all(((i >= 0) & (i <= 1)).all() for i in images)


def test_saved_model_rebuilds_from_weights_and_config_alone(tmp_path):
    model = build_vae(TINY, seed=3).eval()
    save_model(model, model.config.to_dict(), tmp_path / "model")
    rebuilt, config = rebuild_vae(
        tmp_path / "model" / "model.pt", tmp_path / "model" / "model_config.json"
    )
    assert isinstance(rebuilt, TwoLayerVAE) and rebuilt.config == TINY
    x = _x(2)
    torch.testing.assert_close(rebuilt.reconstruct(x), model.reconstruct(x))
