"""The Kingma & Welling VAE: a Gaussian encoder q(z|x), a N(0, I) prior and a decoder p(x|z)."""

from __future__ import annotations

import torch
from torch import nn

from vae_core.config import VAEConfig
from vae_core.models.likelihoods import log_prob, mean_image
from vae_core.models.networks import NETWORKS

# exp(+-10) bounds the variance to [4.5e-5, 2.2e4]: wide enough never to bind on a healthy
# model, tight enough that exp(logvar) cannot overflow and NaN the loss.
LOGVAR_MIN, LOGVAR_MAX = -10.0, 10.0


class VAE(nn.Module):
    """Encoder gives (mu, logvar); z = mu + sigma * eps; the decoder gives pixel logits."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        encoder_cls, decoder_cls = NETWORKS[self.config.architecture]
        self.encoder = encoder_cls(list(self.config.hidden_sizes), self.config.latent_dim)
        self.decoder = decoder_cls(list(self.config.hidden_sizes), self.config.latent_dim)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x); the log-variance is clamped so exp() stays finite."""
        mu, logvar = self.encoder(x)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    @staticmethod
    def reparameterize(
        mu: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): the sample is differentiable in mu and sigma.

        In float32 whatever the autocast: a bf16 eps and z would add noise of their own to the
        sample the ELBO is estimated from.
        """
        mu, logvar = mu.float(), logvar.float()
        eps = torch.randn(mu.shape, device=mu.device, dtype=torch.float32, generator=generator)
        return mu + torch.exp(0.5 * logvar) * eps

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Pixel logits of p(x|z), shape (B, 1, 28, 28)."""
        return self.decoder(z)

    def log_likelihood(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x|z) per example, summed over pixels, in nats."""
        return log_prob(self.config.likelihood, x, logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction (decoder mean at z = mu), in [0, 1]."""
        mu, _ = self.encode(x)
        return mean_image(self.config.likelihood, self.decode(mu))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images from the prior: the decoder mean at z ~ N(0, I), in [0, 1]."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_dim, device=device, generator=generator)
        return mean_image(self.config.likelihood, self.decode(z))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


def build_vae(config: VAEConfig | dict | None = None, seed: int | None = None) -> VAE:
    """Build a VAE from a config object or a plain dict (a saved model_config.json).

    With ``seed``, the initial weights depend on that seed alone (torch's global generator is
    left as it was), so the same seed gives the same model whatever ran before.
    """
    if isinstance(config, dict):
        config = VAEConfig.from_dict(config)
    if seed is None:
        return VAE(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VAE(config)
