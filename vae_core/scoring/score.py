"""Per-image scores of a trained VAE: the anomaly score a scoring run reports and compares.

For each image: log p(x) by the IWAE estimator with k importance samples (a lower bound in
expectation, nats), the reconstruction error -log p(x | z = E[z|x]) (nats, the decoder's
likelihood at the encoder's mean), and that mean itself (the latent code).

Grey levels and a model trained on binarized digits: such a model's likelihood is defined on
0/1 pixels only, so each image is binarized first, a Bernoulli draw with the grey level as the
probability (the same recipe as the fixed binarized holdout whose scores are the drift
reference), seeded by the image's position in the input so a rerun gives the same figures. A
model trained on grey levels (data_variant continuous) scores the grey levels as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vae_core.estimators import iwae_log_likelihood

#: Binarization draws are seeded per block of this many input positions.
BINARIZE_BLOCK = 1024


@dataclass(frozen=True)
class ScoreSettings:
    k: int  # importance samples per image (evaluate.iwae_k)
    seed: int  # importance samples and binarization (evaluate.seed)
    data_variant: str  # what the model was trained on: binarized | continuous
    precision: str = "fp32"  # the IWAE matrix products, resolved (fp32 | bf16)


@dataclass(frozen=True)
class ChunkScores:
    log_likelihood: np.ndarray  # float64 (n,), IWAE with k samples, nats
    reconstruction_nll: np.ndarray  # float64 (n,), -log p(x | z = mu), nats
    latent_mean: np.ndarray  # float32 (n, latent_dim)


def model_inputs(images: np.ndarray, first: int, settings: ScoreSettings) -> torch.Tensor:
    """(n, 28, 28) floats in [0, 1] at input positions first.. -> (n, 1, 28, 28) model inputs:
    binarized by a seeded draw for a binarized model, as they are otherwise."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).reshape(-1, 1, 28, 28)
    if settings.data_variant != "binarized":
        return x
    out = torch.empty_like(x)
    last = first + len(x)
    for block in range(first // BINARIZE_BLOCK, (last - 1) // BINARIZE_BLOCK + 1):
        # Uniforms for a whole block of input positions, seeded by the block alone: an
        # image's draw depends on its position, not on how the input was chunked.
        start = block * BINARIZE_BLOCK
        gen = torch.Generator().manual_seed(settings.seed * 1_000_003 + block)
        u = torch.rand(BINARIZE_BLOCK, 1, 28, 28, generator=gen)
        lo, hi = max(first, start), min(last, start + BINARIZE_BLOCK)
        out[lo - first : hi - first] = (
            u[lo - start : hi - start] < x[lo - first : hi - first]
        ).float()
    return out


@torch.no_grad()
def score_images(
    model: nn.Module, images: np.ndarray, first: int, settings: ScoreSettings
) -> ChunkScores:
    """Scores of the images at input positions `first`, `first + 1`, ... (the positions seed
    the binarization and the importance samples, so chunks can run anywhere, in any order)."""
    model.eval()
    device = next(model.parameters()).device
    x = model_inputs(images, first, settings).to(device)
    positions = np.arange(first, first + len(x), dtype=np.int64)
    log_px = iwae_log_likelihood(
        model, x, settings.k, seed=settings.seed, indices=positions, precision=settings.precision
    )
    mu, _ = model.encode(x)
    recon = -model.log_likelihood(x, model.decode(mu))
    return ChunkScores(
        np.asarray(log_px, dtype=np.float64),
        recon.double().cpu().numpy(),
        mu.float().cpu().numpy(),
    )
