"""Encoder and decoder networks: MLPs (the design document's, Burda's) and a small conv variant.

Encoders map images (B, 1, 28, 28) to (mu, logvar); decoders map z to logits (B, 1, 28, 28).
The MLPs take their hidden activation by name: ReLU for the design document's 784-400-20,
tanh for Burda et al.'s networks.
"""

from __future__ import annotations

import torch
from torch import nn

IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28
ACTIVATION_LAYERS = {"relu": nn.ReLU, "tanh": nn.Tanh}


def mlp(sizes: list[int], activation: str = "relu") -> nn.Sequential:
    """Linear layers between consecutive sizes with the activation between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATION_LAYERS[activation]())
    return nn.Sequential(*layers)


class GaussianMLP(nn.Module):
    """in -> hidden... -> (mu, logvar) of a diagonal Gaussian over `out_dim` units."""

    def __init__(self, in_dim: int, hidden_sizes: list[int], out_dim: int, activation: str):
        super().__init__()
        # (Nested as in the first release, so saved weights keep their names.)
        self.body = nn.Sequential(
            mlp([in_dim, *hidden_sizes], activation), ACTIVATION_LAYERS[activation]()
        )
        self.head = nn.Linear(hidden_sizes[-1], 2 * out_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x.flatten(1))).chunk(2, dim=-1)
        return mu, logvar


class MLPEncoder(GaussianMLP):
    """784 -> hidden... -> (mu, logvar); with hidden=[400], latent=20 this is the design's MLP."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int, activation: str = "relu"):
        super().__init__(IMAGE_PIXELS, hidden_sizes, latent_dim, activation)


class MLPDecoder(nn.Module):
    """z -> hidden (reversed)... -> 784 logits."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int, activation: str = "relu"):
        super().__init__()
        self.net = mlp([latent_dim, *reversed(hidden_sizes), IMAGE_PIXELS], activation)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *IMAGE_SHAPE)


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (28 -> 14 -> 7), then a dense layer to (mu, logvar)."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int, activation: str = "relu"):
        super().__init__()
        act = ACTIVATION_LAYERS[activation]
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1),
            act(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            act(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, hidden_sizes[-1]),
            act(),
        )
        self.head = nn.Linear(hidden_sizes[-1], 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """The mirror of ConvEncoder with transposed convolutions (7 -> 14 -> 28)."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int, activation: str = "relu"):
        super().__init__()
        act = ACTIVATION_LAYERS[activation]
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_sizes[-1]),
            act(),
            nn.Linear(hidden_sizes[-1], 64 * 7 * 7),
            act(),
            nn.Unflatten(1, (64, 7, 7)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            act(),
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


#: The one-stochastic-layer networks; "mlp2" (two stochastic layers) is TwoLayerVAE's own.
NETWORKS = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder)}
