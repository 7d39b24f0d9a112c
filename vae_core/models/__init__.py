"""VAE models: networks, likelihoods and the VAE that ties them together."""

from vae_core.models.likelihoods import LIKELIHOODS, log_prob, mean_image
from vae_core.models.networks import ARCHITECTURES
from vae_core.models.vae import VAE, VAEConfig, build_vae

__all__ = [
    "ARCHITECTURES",
    "LIKELIHOODS",
    "VAE",
    "VAEConfig",
    "build_vae",
    "log_prob",
    "mean_image",
]
