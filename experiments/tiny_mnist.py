"""A tiny synthetic stand-in for MNIST: the four standard IDX files, written in a second, for
dry runs of the harnesses (scripts/gpu_check.sh --dry-run) and for the tests, which must not
need ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_idx_folder(
    folder: Path,
    n_train: int = 120,
    n_test: int = 40,
    *,
    seed: int = 0,
    learnable: bool = False,
    gz: bool = True,
) -> dict[str, np.ndarray]:
    """The four standard IDX files in ``folder``; returns the arrays written.

    ``learnable=False``: uniform random grey levels (for tests of bytes and checks).
    ``learnable=True``: a stand-in for MNIST a VAE can learn, noisy copies of ten random binary
    templates, one per label (for tests that train and compare, and for dry runs).
    ``gz=False`` writes the uncompressed names."""
    from vae_core.data.idx import write_idx
    from vae_core.data.sources import RAW_FILES

    rng = np.random.default_rng(seed)
    labels = (np.arange(n_train + n_test) % 10).astype(np.uint8)
    if learnable:
        templates = rng.random((10, 28, 28)) < 0.15
        flips = rng.random((len(labels), 28, 28)) < 0.05
        images = ((templates[labels] ^ flips) * 255).astype(np.uint8)
    else:
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
    arrays = {
        "train_images": images[:n_train],
        "train_labels": labels[:n_train],
        "test_images": images[n_train:],
        "test_labels": labels[n_train:],
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in RAW_FILES.items():
        write_idx(folder / (name if gz else name.removesuffix(".gz")), arrays[key])
    return arrays
