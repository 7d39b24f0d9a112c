"""Shapes, configuration errors and the clamped log-variance of the VAE variants, one-layer
(MLP, convolutional) and two-layer (Burda's hierarchical MLP)."""

import pytest
import torch
from helpers import TWO_LAYER

from vae_core.models import VAEConfig, build_vae
from vae_core.models.gaussian import reparameterize


@pytest.mark.parametrize(
    "config",
    [
        *(VAEConfig(architecture=a, hidden_sizes=[64], latent_dim=5, likelihood=lik)
          for a in ("mlp", "conv") for lik in ("bernoulli", "continuous_bernoulli")),
        TWO_LAYER,
    ],
    ids=["mlp-bernoulli", "mlp-cb", "conv-bernoulli", "conv-cb", "mlp2"],
)  # fmt: skip
def test_shapes_and_ranges(config):
    model = build_vae(config, seed=0).eval()
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = model.encode(x)  # the top layer's posterior for the two-layer model
    assert mu.shape == logvar.shape == (3, model.latent_dim)
    assert model.decode(mu).shape == (3, 1, 28, 28)
    for images in (model.reconstruct(x), model.sample(4, torch.Generator().manual_seed(0))):
        assert images.shape[1:] == (1, 28, 28)
        assert images.min() >= 0 and images.max() <= 1


def test_default_is_the_design_documents_mlp_and_the_log_variance_is_clamped():
    linear = [m.weight.shape for m in build_vae().modules() if isinstance(m, torch.nn.Linear)]
    assert [tuple(s) for s in linear] == [(400, 784), (40, 400), (400, 20), (784, 400)]
    model = build_vae(VAEConfig(hidden_sizes=[8], latent_dim=2), seed=0)
    with torch.no_grad():
        model.encoder.head.bias[2:] = 1e4
    _, logvar = model.encode(torch.rand(1, 1, 28, 28))
    assert torch.isfinite(logvar.exp()).all() and logvar.max().item() == 10.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("architecture", "rnn"), ("likelihood", "gauss"), ("latent_dim", 0), ("hidden_sizes", [])],
)
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.{field}"):
        VAEConfig(**{field: value})


def test_the_reparameterized_sample_is_float32_under_bf16_autocast():
    model = build_vae({"hidden_sizes": [32], "latent_dim": 4}, seed=0)
    x = torch.rand(8, 1, 28, 28)
    gen = torch.Generator().manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, logvar = model.encode(x)
        eps = torch.randn(mu.shape, generator=gen)
        z = reparameterize(mu, logvar, eps)
    assert mu.dtype == torch.bfloat16  # the encoder ran in bf16 ...
    assert z.dtype == torch.float32  # ... the sample does not
    eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(0))
    expected = mu.float() + torch.exp(0.5 * logvar.float()) * eps
    assert torch.equal(z, expected)
