"""PNG figures of a VAE: samples, reconstructions, latent interpolations and a latent map.

Written with torchvision.utils.save_image only (no plotting library in vae_core). The latent
map's dots are rasterized here into an RGB tensor with a fixed 10-colour palette (matplotlib's
tab10), one colour per digit; its legend row shows one test digit of each class, tinted in that
class's colour, left to right 0..9. Captions (data variant, what is decoded) go in the report.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import make_grid, save_image

from vae_core.evaluation.classifier import as_images
from vae_core.evaluation.likelihood import latent_means, model_device
from vae_core.models.likelihoods import mean_image

PADDING = 2
# matplotlib's tab10, one colour per digit 0..9, as RGB in [0, 1].
PALETTE = (
    torch.tensor(
        [
            [0x1F, 0x77, 0xB4],
            [0xFF, 0x7F, 0x0E],
            [0x2C, 0xA0, 0x2C],
            [0xD6, 0x27, 0x28],
            [0x94, 0x67, 0xBD],
            [0x8C, 0x56, 0x4B],
            [0xE3, 0x77, 0xC2],
            [0x7F, 0x7F, 0x7F],
            [0xBC, 0xBD, 0x22],
            [0x17, 0xBE, 0xCF],
        ],
        dtype=torch.float32,
    )
    / 255.0
)


def grid_size(n: int, nrow: int, tile: int = 28, padding: int = PADDING) -> tuple[int, int]:
    """(height, width) in pixels of make_grid's grid of n tiles, nrow tiles per row."""
    cols = min(n, nrow)
    rows = -(-n // nrow)
    return rows * (tile + padding) + padding, cols * (tile + padding) + padding


def _decode_mean(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    likelihood = getattr(getattr(model, "config", None), "likelihood", "bernoulli")
    return mean_image(likelihood, model.decode(z)).float()


def save_sample_grid(images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """A grid of images (uint8 or floats in [0, 1]), nrow per row, white separators."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(as_images(images).cpu().clamp(0, 1), path, nrow=nrow, padding=PADDING, pad_value=1.0)
    return path


def grid_image(images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """The same grid as save_sample_grid as an RGB uint8 array (H, W, 3), for image loggers."""
    grid = make_grid(as_images(images).cpu().clamp(0, 1), nrow=nrow, padding=PADDING, pad_value=1.0)
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def decoded_grid(model: nn.Module, z: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Decoder means of fixed codes z as a grid (H, W, 3) uint8: the same z epoch after epoch
    shows how the samples improve."""
    with torch.inference_mode():
        return grid_image(_decode_mean(model, z.to(model_device(model))), nrow)


def reconstruction_rows(model: nn.Module, images: torch.Tensor, nrow: int = 8) -> torch.Tensor:
    """Rows of originals, each followed by the row of their reconstructions (decoder mean at
    z = E_q[z|x])."""
    x = as_images(images).to(model_device(model))
    with torch.inference_mode():
        recon = _decode_mean(model, model.encode(x)[0])
    rows = []
    for i in range(0, len(x), nrow):
        rows += [x[i : i + nrow], recon[i : i + nrow]]
    return torch.cat(rows)


def save_reconstructions(model: nn.Module, images: torch.Tensor, path: Path, nrow: int = 8) -> Path:
    """Rows of originals, each followed by the row of their reconstructions (decoder mean at
    z = E_q[z|x]): alternate rows read original / reconstruction."""
    return save_sample_grid(reconstruction_rows(model, images, nrow), path, nrow=nrow)


def save_interpolation(
    model: nn.Module, starts: torch.Tensor, ends: torch.Tensor, path: Path, steps: int = 10
) -> Path:
    """One row per pair: the start image, `steps` decodings along the straight line between
    the two latent means (end points included), and the end image."""
    device = model_device(model)
    a, b = as_images(starts).to(device), as_images(ends).to(device)
    with torch.inference_mode():
        mu_a, mu_b = model.encode(a)[0], model.encode(b)[0]
        t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
        z = mu_a.unsqueeze(1) * (1 - t) + mu_b.unsqueeze(1) * t  # (P, steps, D)
        path_images = _decode_mean(model, z.reshape(-1, z.shape[-1])).view(len(a), steps, 1, 28, 28)
    tiles = torch.cat([a.unsqueeze(1), path_images, b.unsqueeze(1)], dim=1)
    return save_sample_grid(tiles.reshape(-1, 1, 28, 28), path, nrow=steps + 2)


def project_2d(points: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N, 2): the first two principal components (D > 2), as is (D = 2), or padded."""
    x = points.double()
    if x.shape[1] == 2:
        return x
    if x.shape[1] < 2:
        pad = torch.zeros(len(x), 2 - x.shape[1], dtype=x.dtype, device=x.device)
        return torch.cat([x, pad], dim=1)
    centred = x - x.mean(dim=0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:2].T


def rasterize_points(
    xy: torch.Tensor,
    labels: torch.Tensor,
    size: int = 512,
    radius: int = 2,
    margin: int = 8,
    seed: int = 0,
) -> torch.Tensor:
    """Draw coloured dots (palette by label) on a white (3, size, size) canvas.

    Points are drawn in a seeded random order so no class systematically hides another.
    The y axis points up, as in a plot.
    """
    xy = xy.double().cpu()
    labels = labels.long().cpu() % len(PALETTE)
    lo, hi = xy.min(dim=0).values, xy.max(dim=0).values
    scale = (size - 1 - 2 * margin) / (hi - lo).clamp_min(1e-12)
    pix = ((xy - lo) * scale + margin).round().long()
    cols, rows = pix[:, 0], (size - 1) - pix[:, 1]
    order = torch.randperm(len(xy), generator=torch.Generator().manual_seed(seed))
    r = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    disc = (dy**2 + dx**2) <= radius**2
    dy, dx = dy[disc], dx[disc]
    canvas = torch.ones(3, size, size)
    # Later writes win: expand each point to its disc pixels, in drawing order.
    rr = (rows[order, None] + dy[None, :]).clamp(0, size - 1).reshape(-1)
    cc = (cols[order, None] + dx[None, :]).clamp(0, size - 1).reshape(-1)
    colour = PALETTE[labels[order]].repeat_interleave(len(dy), dim=0)  # (N*K, 3)
    flat = canvas.view(3, -1)
    index = rr * size + cc
    for channel in range(3):
        flat[channel].index_put_((index,), colour[:, channel])
    return canvas


def legend_strip(width: int, examples: torch.Tensor | None = None) -> torch.Tensor:
    """A white strip with one tile per class 0..9 in its palette colour: an example digit tinted
    in that colour when `examples` (10 images) is given, else a square. Tiles are 28 pixels, or
    smaller when 10 do not fit in `width`."""
    tile = max(4, min(28, (width - 22) // 10))
    strip = torch.ones(3, tile + 8, width)
    gap = max(0, (width - 10 * tile) // 11)
    for c in range(10):
        x0 = gap + c * (tile + gap)
        colour = PALETTE[c].view(3, 1, 1)
        if examples is not None:
            ink = as_images(examples[c : c + 1]).cpu()  # (1, 1, 28, 28), 1 = ink
            if tile != 28:
                ink = F.interpolate(ink, size=(tile, tile), mode="area")
            tinted = 1 - ink[0] * (1 - colour)
        else:
            tinted = colour.expand(3, tile, tile)
        strip[:, 4 : 4 + tile, x0 : x0 + tile] = tinted
    return strip


def save_latent_map(
    means: torch.Tensor,
    labels: torch.Tensor,
    path: Path,
    size: int = 512,
    legend_examples: torch.Tensor | None = None,
) -> Path:
    """Latent means coloured by label, projected to 2-D by PCA when latent_dim > 2."""
    canvas = rasterize_points(project_2d(means), labels, size=size)
    image = torch.cat([canvas, legend_strip(size, legend_examples)], dim=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image, path)
    return path


def save_model_latent_map(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, path: Path, size: int = 512
) -> Path:
    """Encode images, then save_latent_map with one example digit per class in the legend."""
    means = latent_means(model, as_images(images)).cpu()
    examples = None
    labels = labels.cpu()
    if all(bool((labels == c).any()) for c in range(10)):
        first = [int((labels == c).nonzero()[0]) for c in range(10)]
        examples = as_images(images[first].cpu())
    return save_latent_map(means, labels, path, size=size, legend_examples=examples)
