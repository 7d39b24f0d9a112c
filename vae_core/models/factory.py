"""Build whichever model a config names: the one place that knows every model class."""

from __future__ import annotations

import torch
from torch import nn

from vae_core.config import VAEConfig
from vae_core.models.hierarchical import TwoLayerVAE
from vae_core.models.vae import VAE


def build_vae(config: VAEConfig | dict | None = None, seed: int | None = None) -> nn.Module:
    """Build the model a config names (a config object or a saved model_config.json's dict):
    `mlp2` is Burda's two-stochastic-layer TwoLayerVAE, `mlp` and `conv` the one-layer VAE.

    With ``seed``, the initial weights depend on that seed alone (torch's global generator is
    left as it was), so the same seed gives the same model whatever ran before.
    """
    if isinstance(config, dict):
        config = VAEConfig.from_dict(config)
    config = config or VAEConfig()
    model_cls = TwoLayerVAE if config.architecture == "mlp2" else VAE
    if seed is None:
        return model_cls(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_cls(config)
