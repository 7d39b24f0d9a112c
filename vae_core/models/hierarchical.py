"""Burda et al.'s (2015) VAE with two stochastic layers: x <-> z1 <-> z2.

Inference q(z1|x) q(z2|z1), generation p(z2) = N(0, I), p(z1|z2), p(x|z1); every conditional is a
diagonal Gaussian (Bernoulli or continuous Bernoulli for the pixels) given by a tanh MLP. With
the defaults of params.yaml's `model` section set to hidden_sizes [200, 200], latent_dim 100,
top_hidden_sizes [100, 100], top_latent_dim 50 this is the paper's 784-200-200-100 then
100-100-50 network, mirrored in the generative model.

The KL of z1 has no closed form (its prior depends on z2), so the ELBO is a one-sample
estimate of log p(x, z1, z2) - log q(z1, z2 | x), as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from vae_core.config import VAEConfig
from vae_core.models.gaussian import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    ElboTerms,
    log_normal,
    log_standard_normal,
    reparameterize,
)
from vae_core.models.likelihoods import Scratch, log_prob, mean_image
from vae_core.models.networks import IMAGE_PIXELS, IMAGE_SHAPE, GaussianMLP, mlp
from vae_core.models.vae import FoldedMLP, IWAEScorer, cpu_float32


def _clamped(params: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = params
    return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


class TwoLayerVAE(nn.Module):
    """Two Gaussian latent layers; `encode`/`decode` work with the top one, z2."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig(architecture="mlp2")
        c = self.config
        hidden, top_hidden = list(c.hidden_sizes), list(c.top_hidden_sizes)
        self.q_z1 = GaussianMLP(IMAGE_PIXELS, hidden, c.latent_dim, c.activation)
        self.q_z2 = GaussianMLP(c.latent_dim, top_hidden, c.top_latent_dim, c.activation)
        self.p_z1 = GaussianMLP(c.top_latent_dim, top_hidden[::-1], c.latent_dim, c.activation)
        self.p_x = mlp([c.latent_dim, *hidden[::-1], IMAGE_PIXELS], c.activation)

    @property
    def latent_dim(self) -> int:
        """The size of the code a user encodes to and decodes from: the top layer, z2."""
        return self.config.top_latent_dim

    @property
    def noise_dim(self) -> int:
        return self.config.latent_dim + self.config.top_latent_dim

    def _split(self, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return eps[..., : self.config.latent_dim], eps[..., self.config.latent_dim :]

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z2 | z1 = E[z1 | x]): the deterministic code of an image."""
        mu1, _ = _clamped(self.q_z1(x))
        return _clamped(self.q_z2(mu1))

    def decode(self, z2: torch.Tensor) -> torch.Tensor:
        """Pixel logits of p(x | z1 = E[z1 | z2]), shape (B, 1, 28, 28)."""
        mu1, _ = self.p_z1(z2)
        return self.p_x(mu1).view(-1, *IMAGE_SHAPE)

    def log_likelihood(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x|z1) per example, summed over pixels, in nats."""
        return log_prob(self.config.likelihood, x, logits)

    def log_weight_terms(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z1) and log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1) for eps of
        shape (B, c, noise_dim), each (B, c)."""
        batch, c, _ = eps.shape
        eps1, eps2 = self._split(eps)
        mu1, logvar1 = _clamped(self.q_z1(x))
        z1 = reparameterize(mu1.unsqueeze(1), logvar1.unsqueeze(1), eps1)  # (B, c, D1)
        flat_z1 = z1.reshape(batch * c, -1)
        mu2, logvar2 = _clamped(self.q_z2(flat_z1))
        z2 = reparameterize(mu2, logvar2, eps2.reshape(batch * c, -1))
        prior_mu1, prior_logvar1 = _clamped(self.p_z1(z2))
        logits = self.p_x(flat_z1).view(-1, *IMAGE_SHAPE)
        x_rep = x.unsqueeze(1).expand(batch, c, *x.shape[1:]).reshape(batch * c, *x.shape[1:])
        log_px_z = self.log_likelihood(x_rep, logits).view(batch, c)
        log_q = log_normal(z1, mu1.unsqueeze(1).float(), logvar1.unsqueeze(1).float()) + log_normal(
            z2, mu2.float(), logvar2.float()
        ).view(batch, c)
        log_p = (
            log_normal(flat_z1, prior_mu1.float(), prior_logvar1.float()) + log_standard_normal(z2)
        ).view(batch, c)
        return log_px_z, log_p - log_q

    def iwae_scorer(self, max_rows: int, precision: str = "fp32") -> IWAEScorer | None:
        """The IWAE evaluation's fast path (see OneStochasticLayer.iwae_scorer): the same
        log-weights as `log_weight_terms` for Bernoulli pixels and float32 weights on the CPU,
        with every network folded (FoldedMLP) and p(x|z1) through a BernoulliLinearHead."""
        cls = type(self)
        if (
            cls.log_weight_terms is not TwoLayerVAE.log_weight_terms
            or cls.log_likelihood is not TwoLayerVAE.log_likelihood
            or self.config.likelihood != "bernoulli"
            or not cpu_float32(self)
        ):
            return None
        # bf16: the decoder to the pixels, where the arithmetic is; the small nets in float32.
        pixels_dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        nets = [FoldedMLP.from_module(m) for m in (self.q_z2, self.p_z1)]
        nets.append(FoldedMLP.from_module(self.p_x, pixels_dtype))
        if any(net is None for net in nets) or nets[2].out_features != IMAGE_PIXELS:
            return None
        return _TwoLayerScorer(self, *nets, max_rows)

    def elbo_terms(self, x: torch.Tensor, eps: torch.Tensor) -> ElboTerms:
        """One-sample ELBO; eps has shape (B, noise_dim). `kl` is the one-sample estimate of
        log q(z1, z2 | x) - log p(z1, z2)."""
        log_px_z, log_prior_minus_q = self.log_weight_terms(x, eps.unsqueeze(1))
        return ElboTerms(log_px_z.squeeze(1), -log_prior_minus_q.squeeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction through the means of both layers, in [0, 1]."""
        mu1, _ = self.q_z1(x)
        return mean_image(self.config.likelihood, self.p_x(mu1).view(-1, *IMAGE_SHAPE))

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images: z2 ~ N(0, I), z1 ~ p(z1|z2), the decoder mean of p(x|z1), in [0, 1]."""
        device = next(self.parameters()).device
        z2 = torch.randn(n, self.latent_dim, device=device, generator=generator)
        mu1, logvar1 = _clamped(self.p_z1(z2))
        eps1 = torch.randn(mu1.shape, device=device, generator=generator)
        z1 = reparameterize(mu1, logvar1, eps1)
        return mean_image(self.config.likelihood, self.p_x(z1).view(-1, *IMAGE_SHAPE))

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward(x)


class _TwoLayerScorer(IWAEScorer):
    """TwoLayerVAE.log_weight_terms's sum, computed as OneStochasticLayer's fast path does.

    The same terms: log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z1|x) - log q(z2|z1), where
    the log(2 pi) terms cancel and (z - mu) / sigma is exactly the noise that drew z under q.
    """

    def __init__(
        self, model: TwoLayerVAE, q_z2: FoldedMLP, p_z1: FoldedMLP, p_x: FoldedMLP, max_rows: int
    ):
        self.model = model
        self.q_z2, self.p_z1, self.p_x = q_z2, p_z1, p_x
        self.head = p_x.bernoulli_head()
        self.scratch = Scratch(max_rows)

    def prepare(self, x: torch.Tensor) -> None:
        mu1, logvar1 = _clamped(self.model.q_z1(x))
        self.mu1, logvar1 = mu1.float(), logvar1.float()
        self.std1 = torch.exp(0.5 * logvar1)
        self.half_logvar1_sum = 0.5 * logvar1.double().sum(-1, keepdim=True)
        self.head.prepare(x)

    def log_weights(self, eps: torch.Tensor, images: slice = slice(None)) -> torch.Tensor:
        batch, c, _ = eps.shape
        rows, scratch = batch * c, self.scratch
        d1 = self.mu1.shape[1]
        eps1, eps2 = eps[..., :d1], eps[..., d1:]  # (B, c, D1), (B, c, D2)
        d2 = eps2.shape[-1]

        def split(t: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
            """(mu, clamped logvar) of a network's output, as (B, c, d) views."""
            t = t.view(batch, c, 2 * d)
            return t[..., :d], t[..., d:].clamp_(LOGVAR_MIN, LOGVAR_MAX)

        z1 = scratch.get("z1", rows, d1).view(batch, c, d1)
        torch.mul(self.std1[images].unsqueeze(1), eps1, out=z1)  # as reparameterize
        z1.add_(self.mu1[images].unsqueeze(1))
        mu2, logvar2 = split(self.q_z2(z1.view(rows, d1), scratch, "q2"), d2)
        whole = scratch.padded("z2", rows, d2)  # exp on all of it: see Scratch.padded
        z2 = torch.mul(logvar2, 0.5, out=whole[:rows].view(batch, c, d2))
        whole.exp_()
        z2.mul_(eps2).add_(mu2)
        prior_mu1, prior_logvar1 = split(self.p_z1(z2.view(rows, d2), scratch, "p1"), d1)
        h = self.p_x.hidden(z1.view(rows, d1), scratch, "px")
        log_px_z = self.head.log_prob(h.view(batch, c, -1), scratch, images)
        # -2 log p(z1|z2), up to the log(2 pi) terms: ((z1 - mu) / sigma)^2 + log sigma^2.
        t1 = scratch.get("t1", rows, d1).view(batch, c, d1)
        torch.sub(z1, prior_mu1, out=t1).square_()
        whole = scratch.padded("inv_var", rows, d1)
        inv_var = torch.neg(prior_logvar1, out=whole[:rows].view(batch, c, d1))
        whole.exp_()
        t1.mul_(inv_var).add_(prior_logvar1)
        # -2 log q(z1|x) = eps1^2 + log sigma1^2, and -2 (log q(z2|z1) - log p(z2)) likewise.
        e1 = torch.square(eps1, out=scratch.get("e1", rows, d1).view(batch, c, d1))
        e2 = torch.square(eps2, out=scratch.get("e2", rows, d2).view(batch, c, d2))
        e2.add_(logvar2).sub_(z2.square_())
        twice = e1.sub_(t1).sum(-1).double() + e2.sum(-1).double()  # sums of O(1) terms
        return log_px_z + 0.5 * twice + self.half_logvar1_sum[images]
