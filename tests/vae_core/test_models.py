"""Shapes, configuration errors and the clamped log-variance of the VAE variants."""

import pytest
import torch

from vae_core.models import VAEConfig, build_vae
from vae_core.models.gaussian import reparameterize


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli"])
def test_shapes_and_ranges(architecture, likelihood):
    model = build_vae(
        {
            "architecture": architecture,
            "hidden_sizes": [64],
            "latent_dim": 5,
            "likelihood": likelihood,
        }
    )
    x = torch.rand(3, 1, 28, 28)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 5)
    assert model.decode(mu).shape == (3, 1, 28, 28)
    for images in (model.reconstruct(x), model.sample(4, torch.Generator().manual_seed(0))):
        assert images.min() >= 0 and images.max() <= 1


def test_default_is_the_design_documents_mlp():
    model = build_vae()
    linear_shapes = [
        tuple(m.weight.shape) for m in model.modules() if isinstance(m, torch.nn.Linear)
    ]
    assert linear_shapes == [(400, 784), (40, 400), (400, 20), (784, 400)]


def test_log_variance_is_clamped():
    model = build_vae(VAEConfig(hidden_sizes=[8], latent_dim=2))
    with torch.no_grad():
        model.encoder.head.bias[2:] = 1e4
    _, logvar = model.encode(torch.rand(1, 1, 28, 28))
    assert torch.isfinite(logvar.exp()).all() and logvar.max().item() == 10.0


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("architecture", "rnn", "model.architecture"),
        ("likelihood", "gauss", "model.likelihood"),
        ("latent_dim", 0, "model.latent_dim"),
        ("hidden_sizes", [], "model.hidden_sizes"),
    ],
)
def test_bad_config_names_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
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
