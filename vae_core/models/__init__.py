"""VAE models: networks, likelihoods and the VAE that ties them together."""

from vae_core.config import VAEConfig
from vae_core.models.factory import build_vae
from vae_core.models.hierarchical import TwoLayerVAE
from vae_core.models.likelihoods import log_prob, mean_image
from vae_core.models.networks import NETWORKS
from vae_core.models.vae import VAE

__all__ = ["NETWORKS", "VAE", "TwoLayerVAE", "VAEConfig", "build_vae", "log_prob", "mean_image"]
