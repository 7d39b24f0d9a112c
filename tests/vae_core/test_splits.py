"""Splits: seeded validation split, fixed binarized test, pickle-free files (the trainer's
float view and dynamic binarization are tested in test_trainer.py)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tree_digest, write_idx_folder

from vae_core import data
from vae_core.data import splits as splits_mod


@pytest.fixture
def arrays(tmp_path: Path) -> tuple[np.ndarray, ...]:
    write_idx_folder(tmp_path / "raw", 200, 50)
    return data.load_raw(tmp_path / "raw")


def split(arrays, val_size: int = 30, split_seed: int = 0, binarize_seed: int = 0):
    return data.make_splits(
        *arrays, val_size=val_size, split_seed=split_seed, binarize_seed=binarize_seed
    )


def test_make_splits_shapes_and_types(arrays) -> None:
    s, idx = split(arrays)
    assert isinstance(s, data.DatasetSplits)
    assert s.counts() == {"train": 170, "val": 30, "holdout": 0, "test": 50}
    assert s.train_images.dtype == torch.uint8 and s.train_images.shape == (170, 28, 28)
    assert s.train_labels.dtype == torch.int64 and s.val_labels.dtype == torch.int64
    assert s.test_binarized.dtype == torch.uint8
    assert set(s.test_binarized.unique().tolist()) <= {0, 1}
    # indices: disjoint, cover the training file, and pick the right rows
    assert np.intersect1d(idx["train"], idx["val"]).size == 0
    assert np.array_equal(np.sort(np.concatenate([idx["train"], idx["val"]])), np.arange(200))
    assert np.array_equal(s.val_images.numpy(), arrays[0][idx["val"]])
    assert np.array_equal(s.test_images.numpy(), arrays[2])


def test_the_split_and_the_binarized_test_set_are_fixed_by_their_own_seeds(arrays) -> None:
    a, ia = split(arrays, split_seed=1)
    b, ib = split(arrays, split_seed=1)
    c, ic = split(arrays, split_seed=2, binarize_seed=1)
    assert np.array_equal(ia["val"], ib["val"]) and torch.equal(a.val_images, b.val_images)
    assert torch.equal(a.test_binarized, b.test_binarized)
    assert not np.array_equal(ia["val"], ic["val"])
    assert not torch.equal(a.test_binarized, c.test_binarized)
    assert torch.equal(split(arrays, split_seed=2)[0].test_binarized, a.test_binarized)
    # the draw follows the grey levels: its mean is close to the mean intensity
    grey = a.test_images.double().mean() / 255
    assert abs(a.test_binarized.double().mean() - grey) < 0.01


@pytest.mark.parametrize("val_size", [0, 200, 201, -1, True, 2.5])
def test_val_size_must_fit(arrays, val_size) -> None:
    refused = rf"data.val_size = {val_size!r} .*training set of 200 images.*1 to 199"
    with pytest.raises(data.SplitError, match=refused):
        split(arrays, val_size=val_size)


def test_save_and_load_round_trip_and_the_files_are_reproducible(arrays, tmp_path) -> None:
    s, idx = split(arrays)
    stats = data.save_processed(s, idx, tmp_path / "proc", extra_stats={"split_seed": 0})
    back = data.load_processed(tmp_path / "proc")
    for name in splits_mod.ARRAY_FILES:
        assert torch.equal(getattr(back, name), getattr(s, name)), name
    loaded = data.load_split_indices(tmp_path / "proc")
    assert np.array_equal(loaded["val"], idx["val"])
    for f in (tmp_path / "proc").glob("*.npy"):
        np.load(f, allow_pickle=False)  # no pickle anywhere
    on_disk = json.loads((tmp_path / "proc" / "stats.json").read_text())
    assert on_disk == stats
    assert stats["counts"] == {"train": 170, "val": 30, "holdout": 0, "test": 50}
    assert sum(stats["class_counts"]["val"]) == 30
    assert stats["class_counts"]["test"] == [5] * 10
    assert stats["shapes"]["train"] == [170, 28, 28]
    assert 0.4 < stats["pixel_mean"]["train"] < 0.6  # uniform random grey levels
    assert stats["split_seed"] == 0
    assert np.load(tmp_path / "proc" / "train_labels.npy").dtype == np.uint8  # compact
    data.save_processed(s, idx, tmp_path / "again", extra_stats={"split_seed": 0})
    assert tree_digest(tmp_path / "again") == tree_digest(tmp_path / "proc")  # byte for byte


def test_failed_save_leaves_previous_output(arrays, tmp_path: Path, monkeypatch) -> None:
    s, idx = split(arrays)
    data.save_processed(s, idx, tmp_path / "proc")
    before = tree_digest(tmp_path / "proc")

    def boom(*args, **kwargs):
        raise OSError("interrupted")

    monkeypatch.setattr(splits_mod, "atomic_write_text", boom)  # stats.json, written last
    s2, idx2 = split(arrays, split_seed=5)
    with pytest.raises(OSError, match="interrupted"):
        data.save_processed(s2, idx2, tmp_path / "proc")
    assert tree_digest(tmp_path / "proc") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["proc", "raw"]  # no temp folders


def test_a_missing_pickled_or_wrong_processed_file_is_refused(arrays, tmp_path: Path) -> None:
    s, idx = split(arrays)
    data.save_processed(s, idx, tmp_path / "proc")
    with pytest.raises(data.ProcessedDataError, match="expected a processed-data folder"):
        data.load_processed(tmp_path / "nothing")
    np.save(tmp_path / "proc" / "test_labels.npy", np.array([{"a": 1}], dtype=object))
    pickled = r"test_labels.npy: expected a .npy array that"
    with pytest.raises(data.ProcessedDataError, match=pickled):
        data.load_processed(tmp_path / "proc")
    np.save(tmp_path / "proc" / "test_labels.npy", np.zeros(3, np.uint8))
    with pytest.raises(data.DatasetMismatchError, match="counts disagree"):
        data.load_processed(tmp_path / "proc")
    (tmp_path / "proc" / "val_labels.npy").unlink()
    with pytest.raises(data.ProcessedDataError, match=r"val_labels.npy: missing"):
        data.load_processed(tmp_path / "proc")
    img, lab = torch.zeros(3, 28, 28, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64)
    with pytest.raises(data.ProcessedDataError, match="val_labels: expected an int64"):
        data.DatasetSplits(img, lab, img, lab.to(torch.uint8), img, lab, img, lab, img, img)
    with pytest.raises(data.ProcessedDataError, match="test_binarized"):
        data.DatasetSplits(img, lab, img, lab, img, lab, img, lab, img, img[:2])
    with pytest.raises(data.ProcessedDataError, match="holdout_binarized"):
        data.DatasetSplits(img, lab, img, lab, img, lab, img, lab, img[:1], img)


def test_load_raw_checks_the_manifest(tmp_path: Path) -> None:
    from vae_core.data import fetch_raw
    from vae_core.data.idx import write_idx

    write_idx_folder(tmp_path / "src")
    fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")
    assert data.load_raw(tmp_path / "raw")[0].shape == (120, 28, 28)
    labels = np.zeros(40, np.uint8)
    write_idx(tmp_path / "raw" / "t10k-labels-idx1-ubyte.gz", labels)  # edited after fetch
    mismatch = r"t10k-labels-idx1-ubyte.gz: sha256 checksum mismatch"
    with pytest.raises(data.ChecksumError, match=mismatch):
        data.load_raw(tmp_path / "raw")


def test_load_splits_embedded_cached_and_a_folder(tmp_path: Path) -> None:
    s = data.load_splits("embedded", val_size=500, cache_dir=tmp_path / "cache")
    assert s.counts() == {"train": 3500, "val": 500, "holdout": 0, "test": 1000}
    assert torch.bincount(s.test_labels).tolist() == [100] * 10
    manifest = tmp_path / "cache" / "mnist" / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    again = data.load_splits("embedded", val_size=500, cache_dir=tmp_path / "cache")  # reuses cache
    assert manifest.stat().st_mtime_ns == stamp
    assert torch.equal(again.val_images, s.val_images)
    write_idx_folder(tmp_path / "src", 100, 20)  # a folder, without a cache
    s = data.load_splits(str(tmp_path / "src"), val_size=10, split_seed=3)
    assert s.counts() == {"train": 90, "val": 10, "holdout": 0, "test": 20}


def test_the_holdout_is_carved_from_training_data_and_leaves_test_and_val_alone() -> None:
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (300, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels, test_labels = ((np.arange(n) % 10).astype(np.uint8) for n in (300, 40))
    common = dict(val_size=30, split_seed=3, binarize_seed=4)
    without, rows0 = data.split_arrays(train, labels, test, test_labels, **common)
    arrays, rows = data.split_arrays(train, labels, test, test_labels, holdout_size=50, **common)
    # Three disjoint sets of training rows that cover it all; val and test do not move.
    assert sorted(np.concatenate([rows["train"], rows["val"], rows["holdout"]])) == list(range(300))
    assert len(rows["holdout"]) == 50 and len(rows["train"]) == 220
    np.testing.assert_array_equal(rows["val"], rows0["val"])
    np.testing.assert_array_equal(arrays["test_binarized"], without["test_binarized"])
    np.testing.assert_array_equal(arrays["holdout_images"], train[rows["holdout"]])
    # The holdout has its own fixed binarized copy, drawn from the binarize seed.
    again, _ = data.split_arrays(train, labels, test, test_labels, holdout_size=50, **common)
    np.testing.assert_array_equal(arrays["holdout_binarized"], again["holdout_binarized"])
    assert set(np.unique(arrays["holdout_binarized"])) <= {0, 1}
    with pytest.raises(data.SplitError, match="data.val_size = 30 and data.holdout_size = 270"):
        data.split_arrays(train, labels, test, test_labels, holdout_size=270, **common)
