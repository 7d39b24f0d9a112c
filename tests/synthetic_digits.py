"""A learnable stand-in for MNIST, written as the four standard IDX files: noisy copies of ten
random 28 x 28 templates, one per label. Tests that need a folder source use it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_digit_folder(folder: Path, n_train: int, n_test: int, seed: int = 0) -> None:
    from vae_core.data.idx import write_idx
    from vae_core.data.sources import RAW_FILES

    rng = np.random.default_rng(seed)
    templates = rng.random((10, 28, 28)) < 0.15
    labels = (np.arange(n_train + n_test) % 10).astype(np.uint8)
    flips = rng.random((len(labels), 28, 28)) < 0.05
    images = ((templates[labels] ^ flips) * 255).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": images[:n_train],
        "train_labels": labels[:n_train],
        "test_images": images[n_train:],
        "test_labels": labels[n_train:],
    }
    for key, name in RAW_FILES.items():
        write_idx(folder / name, arrays[key])
