"""PNG writers: files are written where asked, decode, have the sizes the grid layout implies,
and hold the pixels they claim (the model's own outputs, the originals, the palette)."""

import torch
from torchvision.io import read_image

from vae_core.evaluation import images as figs
from vae_core.models import VAEConfig, build_vae


def _vae(latent_dim: int = 4):
    return build_vae(VAEConfig(hidden_sizes=[32], latent_dim=latent_dim), seed=0).eval()


def _images(n: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=gen)


def _tile(image: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """The 28 x 28 tile at (row, col) of a PNG grid read back (first channel)."""
    top, left = row * (28 + figs.PADDING) + figs.PADDING, col * (28 + figs.PADDING) + figs.PADDING
    return image[0, top : top + 28, left : left + 28]


def _as_png(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] quantized as save_image writes them."""
    return (images.reshape(-1, 28, 28) * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal grey levels, up to one level where a value sits on a rounding edge."""
    return (a.int() - b.int()).abs().max().item() <= 1


def test_sample_grid_and_reconstruction_rows_alternating_with_the_originals(tmp_path):
    path = figs.save_sample_grid(_images(64), tmp_path / "samples.png", nrow=8)
    assert tuple(read_image(str(path)).shape[1:]) == figs.grid_size(64, 8) == (242, 242)
    model, x = _vae(), _images(16)
    path = figs.save_reconstructions(model, x, tmp_path / "out" / "recon.png", nrow=8)
    assert path == tmp_path / "out" / "recon.png" and path.is_file()
    image = read_image(str(path))
    assert tuple(image.shape[1:]) == figs.grid_size(32, 8) == (122, 242)
    # Rows 0 and 2 are the originals; rows 1 and 3 the model's own decoder mean at E_q[z|x].
    with torch.no_grad():
        recon = _as_png(torch.sigmoid(model.decode(model.encode(x.float() / 255)[0])))
    for i in range(16):
        row, col = 2 * (i // 8), i % 8
        assert torch.equal(_tile(image, row, col), x[i]), i
        assert _close(_tile(image, row + 1, col), recon[i]), i
    assert not _close(recon[0], recon[1])  # the reconstructions tell the images apart


def test_interpolation_rows_hold_both_ends_and_the_path(tmp_path):
    model, x = _vae(), _images(6).float() / 255
    path = figs.save_interpolation(model, x[:3], x[3:], tmp_path / "interp.png", steps=5)
    assert path == tmp_path / "interp.png" and path.is_file()
    image = read_image(str(path))
    assert tuple(image.shape[1:]) == figs.grid_size(3 * 7, 7) == (92, 212)
    with torch.no_grad():
        mu_a, mu_b = model.encode(x[:3])[0], model.encode(x[3:])[0]
        for t, col in ((0.0, 1), (0.5, 3), (1.0, 5)):  # the ends and the midpoint of 5 steps
            decoded = _as_png(torch.sigmoid(model.decode(mu_a * (1 - t) + mu_b * t)))
            for row in range(3):
                assert _close(_tile(image, row, col), decoded[row]), (row, t)
    for row in range(3):  # each row starts with its start image and ends with its end image
        assert _close(_tile(image, row, 0), _as_png(x[row]))
        assert _close(_tile(image, row, 6), _as_png(x[3 + row]))
    assert not _close(_tile(image, 0, 1), _tile(image, 0, 5))  # the path does go somewhere


def test_latent_map_sizes_palette_and_pca(tmp_path):
    labels = torch.arange(200) % 10
    means = torch.randn(200, 2, generator=torch.Generator().manual_seed(0))
    path = figs.save_latent_map(means, labels, tmp_path / "map2.png", size=256)
    height = 256 + figs.legend_strip(256).shape[1]
    assert tuple(read_image(str(path)).shape) == (3, height, 256)
    # latent_dim > 2 goes through PCA; the legend uses a test digit of each class.
    path = figs.save_model_latent_map(_vae(6), _images(50), labels[:50], tmp_path / "m.png")
    assert tuple(read_image(str(path)).shape) == (3, 512 + 36, 512)
    xy = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    canvas = figs.rasterize_points(xy, torch.tensor([0, 3]), size=64, radius=1, margin=4)
    # Point 0 at the bottom-left corner, point 1 at the top-right (y axis points up).
    assert torch.allclose(canvas[:, 59, 4], figs.PALETTE[0])
    assert torch.allclose(canvas[:, 4, 59], figs.PALETTE[3])
    assert torch.allclose(canvas[:, 32, 32], torch.ones(3))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=gen) * torch.tensor([5.0, 3.0, 1.0, 0.5, 0.1])
    xy = figs.project_2d(x)
    assert xy.shape == (500, 2)
    variances = xy.var(dim=0)
    assert variances[0] > variances[1] > x[:, 2:].var(dim=0).max()
    assert torch.equal(figs.project_2d(x[:, :2]), x[:, :2].double())
    assert figs.project_2d(x[:, :1]).shape == (500, 2)
