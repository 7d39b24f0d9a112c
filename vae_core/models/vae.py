"""The Kingma & Welling VAE: a Gaussian encoder q(z|x), a N(0, I) prior and a decoder p(x|z).

Every model of the library answers three questions the objectives and the evaluation ask:
`elbo_terms(x, eps)` (one-sample ELBO, analytic KL where there is one), `log_weight_terms(x,
eps)` (the importance weights log p(x|z) and log p(z) - log q(z|x) for c samples per image, the
IWAE bound's raw material) and `noise_dim` (the size of the standard-normal noise one sample
needs). The noise comes from outside, so the caller owns the random numbers: evaluation seeds
them per example, the trainer draws them outside a compiled loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vae_core.config import VAEConfig
from vae_core.models.gaussian import (
    LOGVAR_MAX,
    LOGVAR_MIN,
    ElboTerms,
    gaussian_kl,
    reparameterize,
)
from vae_core.models.likelihoods import BernoulliLinearHead, Scratch, log_prob, mean_image
from vae_core.models.networks import IMAGE_PIXELS, NETWORKS, GaussianMLP, MLPDecoder


class OneStochasticLayer(nn.Module):
    """The bounds of a model with one Gaussian latent layer and a N(0, I) prior, written once
    in terms of `encode(x) -> (mu, logvar)`, `decode(z)` and `log_likelihood(x, decoded)`."""

    @property
    def noise_dim(self) -> int:
        return self.latent_dim

    def elbo_terms(self, x: torch.Tensor, eps: torch.Tensor) -> ElboTerms:
        """One-sample ELBO with the analytic KL; eps has shape (B, latent_dim)."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar, eps)
        return ElboTerms(self.log_likelihood(x, self.decode(z)), gaussian_kl(mu, logvar))

    def log_weight_terms(
        self, x: torch.Tensor, eps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z_i) and log p(z_i) - log q(z_i|x) for eps of shape (B, c, latent_dim)."""
        mu, logvar = self.encode(x)
        batch, c, dim = eps.shape
        z = reparameterize(mu.unsqueeze(1), logvar.unsqueeze(1), eps)  # (B, c, D)
        decoded = self.decode(z.reshape(batch * c, dim))
        x_rep = x.unsqueeze(1).expand(batch, c, *x.shape[1:]).reshape(batch * c, *x.shape[1:])
        log_px_z = self.log_likelihood(x_rep, decoded).view(batch, c)
        # The log(2 pi) terms cancel and (z - mu) / sigma is exactly eps.
        eps = eps.to(z.dtype)
        log_prior_minus_q = -0.5 * z.pow(2).sum(-1) + 0.5 * (
            eps.pow(2) + logvar.to(z.dtype).unsqueeze(1)
        ).sum(-1)
        return log_px_z, log_prior_minus_q

    def iwae_scorer(self, max_rows: int, precision: str = "fp32") -> IWAEScorer | None:
        """The IWAE evaluation's fast path, or None where this model has none. With precision
        bf16 the decoder's matrix products run in bf16 (see BernoulliLinearHead).

        For a VAE with an MLP decoder (ReLU or tanh) ending in a linear layer and the Bernoulli
        likelihood, with float32 weights on the CPU: the same log-weights as `log_weight_terms`
        (log p(x|z) + log p(z) - log q(z|x), in float64), computed for inference only with
        the per-pixel work cut to one sigmoid pass (`BernoulliLinearHead`). Other models (conv,
        continuous Bernoulli, subclasses with their own decoder or likelihood) have none.
        """
        cls = type(self)
        if (
            not isinstance(self, VAE)
            or cls.log_weight_terms is not OneStochasticLayer.log_weight_terms
            or cls.encode is not VAE.encode
            or cls.decode is not VAE.decode
            or cls.log_likelihood is not VAE.log_likelihood
            or self.config.likelihood != "bernoulli"
            or type(self.decoder) is not MLPDecoder
            or not cpu_float32(self)
        ):
            return None
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        decoder = FoldedMLP.from_module(self.decoder.net, dtype)
        if decoder is None or decoder.out_features != IMAGE_PIXELS:
            return None
        return _OneLayerScorer(self, decoder, max_rows)


class IWAEScorer:
    """A model's fast path for the IWAE evaluation (inference only, see `iwae_scorer`).

    `prepare(x)` once per batch of images, then `log_weights(eps, images)` for chunks of its
    noise: eps of shape (B, c, noise_dim) for the B images `images` (a slice of the batch)
    gives log p(x, z) - log q(z | x) of shape (B, c), float64. An instance keeps scratch
    buffers and the batch's state: one per thread.
    """

    def prepare(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def log_weights(self, eps: torch.Tensor, images: slice = slice(None)) -> torch.Tensor:
        raise NotImplementedError


def cpu_float32(model: nn.Module) -> bool:
    return all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())


class FoldedMLP:
    """An inference-only float32 copy of an MLP: Linear layers with ReLU or tanh between them.

    A tanh unit is computed as a sigmoid, tanh(a) = 2 sigmoid(2a) - 1, with the 2 folded into
    the layer's weights and the 2 u - 1 into the next layer's weights and bias: the same
    function (up to float32 rounding, about 1e-7 per unit), but torch's vectorized sigmoid
    is several times faster than its tanh on the CPU. Each layer writes into a scratch buffer.
    """

    def __init__(
        self,
        linears: Sequence[nn.Linear],
        activations: Sequence[str],
        dtype: torch.dtype = torch.float32,
    ):
        assert len(activations) == len(linears) - 1
        self.dtype = dtype  # of the weights and the layers' outputs: float32, or bf16
        self.weights_t: list[torch.Tensor] = []  # (in, out), contiguous
        self.biases: list[torch.Tensor] = []
        self.activations = [*("sigmoid" if a == "tanh" else a for a in activations), ""]
        scale, shift = 1.0, 0.0  # the layer's input is scale * u + shift of what we compute, u
        for i, layer in enumerate(linears):
            weight = layer.weight.detach().double()
            bias = layer.bias.detach().double() if layer.bias is not None else 0.0 * weight[:, 0]
            bias = bias + shift * weight.sum(1)
            weight = scale * weight
            if i < len(activations) and activations[i] == "tanh":
                weight, bias, scale, shift = 2.0 * weight, 2.0 * bias, 2.0, -1.0
            else:
                scale, shift = 1.0, 0.0
            self.weights_t.append(weight.T.to(dtype).contiguous())
            self.biases.append(bias.to(dtype))

    @classmethod
    def from_module(cls, module: nn.Module, dtype: torch.dtype = torch.float32) -> FoldedMLP | None:
        """Fold a Sequential of Linear / ReLU / Tanh layers (nested Sequentials and GaussianMLPs
        are flattened), Linear first and last; None for anything else."""
        layers = _flat_layers(module)
        if not layers or not isinstance(layers[0], nn.Linear):
            return None
        linears, activations = [layers[0]], []
        for prev, layer in zip(layers[:-1], layers[1:], strict=True):
            if isinstance(layer, nn.Linear) and not isinstance(prev, nn.Linear):
                linears.append(layer)
            elif not isinstance(layer, nn.Linear) and isinstance(prev, nn.Linear):
                activations.append("relu" if isinstance(layer, nn.ReLU) else "tanh")
            else:
                return None
        if len(activations) != len(linears) - 1:
            return None  # ends with an activation
        return cls(linears, activations, dtype)

    @property
    def out_features(self) -> int:
        return self.biases[-1].numel()

    def hidden(self, u: torch.Tensor, scratch: Scratch, name: str) -> torch.Tensor:
        """The last hidden layer's units (what the last Linear multiplies) for inputs u."""
        rows = u.shape[0]
        if u.dtype != self.dtype:
            u = scratch.get(f"{name}in", rows, u.shape[1], dtype=self.dtype).copy_(u)
        for i in range(len(self.biases) - 1):
            whole = scratch.padded(f"{name}{i}", rows, self.biases[i].numel(), self.dtype)
            u = torch.addmm(self.biases[i], u, self.weights_t[i], out=whole[:rows])
            whole.relu_() if self.activations[i] == "relu" else whole.sigmoid_()
        return u

    def __call__(self, u: torch.Tensor, scratch: Scratch, name: str) -> torch.Tensor:
        """The network's output for inputs u, in a scratch buffer."""
        h = self.hidden(u, scratch, name)
        out = scratch.get(f"{name}out", u.shape[0], self.out_features, dtype=self.dtype)
        return torch.addmm(self.biases[-1], h, self.weights_t[-1], out=out)

    def bernoulli_head(self) -> BernoulliLinearHead:
        """The last layer as a Bernoulli likelihood head (see BernoulliLinearHead)."""
        return BernoulliLinearHead(self.weights_t[-1], self.biases[-1])


def _flat_layers(module: nn.Module) -> list[nn.Module] | None:
    if type(module) is nn.Sequential:
        layers: list[nn.Module] = []
        for child in module:
            sub = _flat_layers(child)
            if sub is None:
                return None
            layers += sub
        return layers
    if isinstance(module, GaussianMLP) and type(module).forward is GaussianMLP.forward:
        body = _flat_layers(module.body)
        return None if body is None else [*body, module.head]
    if type(module) in (nn.Linear, nn.ReLU, nn.Tanh):
        return [module]
    return None


class _OneLayerScorer(IWAEScorer):
    """OneStochasticLayer.log_weight_terms's sum for an MLP decoder and Bernoulli pixels."""

    def __init__(self, model: VAE, decoder: FoldedMLP, max_rows: int):
        self.model = model
        self.decoder = decoder
        self.head = decoder.bernoulli_head()
        self.scratch = Scratch(max_rows)

    def prepare(self, x: torch.Tensor) -> None:
        mu, logvar = self.model.encode(x)
        self.mu, self.logvar = mu.float(), logvar.float()
        self.std = torch.exp(0.5 * self.logvar)
        self.half_logvar_sum = 0.5 * self.logvar.double().sum(-1, keepdim=True)
        self.head.prepare(x)

    def log_weights(self, eps: torch.Tensor, images: slice = slice(None)) -> torch.Tensor:
        batch, c, dim = eps.shape
        rows = batch * c
        z = self.scratch.get("z", rows, dim).view(batch, c, dim)
        torch.mul(self.std[images].unsqueeze(1), eps, out=z)  # as reparameterize
        z.add_(self.mu[images].unsqueeze(1))
        h = self.decoder.hidden(z.view(rows, dim), self.scratch, "dec")
        log_px_z = self.head.log_prob(h.view(batch, c, -1), self.scratch, images)
        # log p(z) - log q(z|x): the log(2 pi) terms cancel and (z - mu) / sigma is exactly eps.
        twice = torch.square(eps, out=self.scratch.get("e", rows, dim).view(batch, c, dim))
        twice = twice.sub_(z.square_()).sum(-1).double()  # a sum of O(1) terms
        return log_px_z + 0.5 * twice + self.half_logvar_sum[images]


class VAE(OneStochasticLayer):
    """Encoder gives (mu, logvar); z = mu + sigma * eps; the decoder gives pixel logits."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config or VAEConfig()
        encoder_cls, decoder_cls = NETWORKS[self.config.architecture]
        hidden, latent = list(self.config.hidden_sizes), self.config.latent_dim
        self.encoder = encoder_cls(hidden, latent, self.config.activation)
        self.decoder = decoder_cls(hidden, latent, self.config.activation)

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Parameters of q(z|x); the log-variance is clamped so exp() stays finite."""
        mu, logvar = self.encoder(x)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

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
