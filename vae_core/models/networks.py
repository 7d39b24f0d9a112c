"""Encoder and decoder networks: the design document's MLP and a small convolutional variant.

Encoders map images (B, 1, 28, 28) to (mu, logvar); decoders map z to logits (B, 1, 28, 28).
"""

from __future__ import annotations

import torch
from torch import nn

from vae_core.config import ARCHITECTURES

IMAGE_SHAPE = (1, 28, 28)
IMAGE_PIXELS = 28 * 28


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """784 -> hidden... -> (mu, logvar); with hidden=[400], latent=20 this is the design's MLP."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(_mlp([IMAGE_PIXELS, *hidden_sizes]), nn.ReLU())
        self.head = nn.Linear(hidden_sizes[-1], 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x.flatten(1))).chunk(2, dim=1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """z -> hidden (reversed)... -> 784 logits."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int):
        super().__init__()
        self.net = _mlp([latent_dim, *reversed(hidden_sizes), IMAGE_PIXELS])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *IMAGE_SHAPE)


class ConvEncoder(nn.Module):
    """Two stride-2 convolutions (28 -> 14 -> 7), then a dense layer to (mu, logvar)."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, hidden_sizes[-1]),
            nn.ReLU(),
        )
        self.head = nn.Linear(hidden_sizes[-1], 2 * latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.head(self.body(x)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """The mirror of ConvEncoder with transposed convolutions (7 -> 14 -> 28)."""

    def __init__(self, hidden_sizes: list[int], latent_dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_sizes[-1]),
            nn.ReLU(),
            nn.Linear(hidden_sizes[-1], 64 * 7 * 7),
            nn.ReLU(),
            nn.Unflatten(1, (64, 7, 7)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(32, 1, 4, stride=2, padding=1),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


NETWORKS = {"mlp": (MLPEncoder, MLPDecoder), "conv": (ConvEncoder, ConvDecoder)}
assert tuple(NETWORKS) == ARCHITECTURES, "vae_core.config.ARCHITECTURES names the implemented ones"
