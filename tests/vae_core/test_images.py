"""PNG writers: files exist, decode, and have the sizes the grid layout implies."""

from __future__ import annotations

import torch
from torchvision.io import read_image

from vae_core.evaluation.images import (
    PALETTE,
    grid_size,
    legend_strip,
    project_2d,
    rasterize_points,
    save_interpolation,
    save_latent_map,
    save_model_latent_map,
    save_reconstructions,
    save_sample_grid,
)
from vae_core.models.vae import VAE, VAEConfig


def _vae(latent_dim: int = 4) -> VAE:
    torch.manual_seed(0)
    return VAE(VAEConfig(hidden_sizes=[32], latent_dim=latent_dim)).eval()


def _images(n: int) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(n)
    )


def test_sample_grid_has_the_grid_size(tmp_path):
    path = save_sample_grid(_images(64), tmp_path / "samples.png", nrow=8)
    image = read_image(str(path))
    assert tuple(image.shape[1:]) == grid_size(64, 8) == (242, 242)


def test_reconstructions_alternate_original_and_reconstruction_rows(tmp_path):
    path = save_reconstructions(_vae(), _images(16), tmp_path / "recon.png", nrow=8)
    image = read_image(str(path))
    assert tuple(image.shape[1:]) == grid_size(32, 8) == (122, 242)
    # The first row of tiles is the originals themselves.
    original = _images(16)[0]
    assert torch.equal(image[0, 2:30, 2:30], original)


def test_interpolation_rows_hold_both_ends_and_the_path(tmp_path):
    x = _images(6).float() / 255
    path = save_interpolation(_vae(), x[:3], x[3:], tmp_path / "interp.png", steps=5)
    image = read_image(str(path))
    assert tuple(image.shape[1:]) == grid_size(3 * 7, 7) == (92, 212)


def test_latent_map_sizes_and_palette(tmp_path):
    labels = torch.arange(200) % 10
    means = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    path = save_latent_map(means, labels, tmp_path / "map2.png", size=256)
    image = read_image(str(path))
    assert image.shape[0] == 3 and tuple(image.shape[1:]) == (256 + legend_strip(256).shape[1], 256)
    # latent_dim > 2 goes through PCA; the legend uses a test digit of each class.
    path = save_model_latent_map(_vae(latent_dim=6), _images(50), labels[:50], tmp_path / "m.png")
    assert tuple(read_image(str(path)).shape) == (3, 512 + 36, 512)


def test_rasterized_dots_take_their_class_colour():
    xy = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    canvas = rasterize_points(xy, torch.tensor([0, 3]), size=64, radius=1, margin=4)
    # Point 0 at the bottom-left corner, point 1 at the top-right (y axis points up).
    assert torch.allclose(canvas[:, 59, 4], PALETTE[0])
    assert torch.allclose(canvas[:, 4, 59], PALETTE[3])
    assert torch.allclose(canvas[:, 32, 32], torch.ones(3))


def test_project_2d_is_pca():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=gen) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    xy = project_2d(x)
    assert xy.shape == (500, 2)
    variances = xy.var(dim=0)
    assert variances[0] > variances[1] > x[:, 2:].var(dim=0).max()
    assert torch.equal(project_2d(x[:, :2]), x[:, :2].double())
    assert project_2d(x[:, :1]).shape == (500, 2)
