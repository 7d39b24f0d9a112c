"""From raw IDX files to the tensors a trainer uses: seeded validation split, fixed binarized
test set and a compact pickle-free on-disk format. (The float and dynamically binarized views
of the images belong to the trainer: ``vae_core.training.trainer.to_unit_float``.)

Processed folder layout (every array a ``.npy`` file that loads with ``allow_pickle=False``)::

    train_images.npy  uint8 N x 28 x 28     train_labels.npy  uint8 N
    val_images.npy    uint8 V x 28 x 28     val_labels.npy    uint8 V
    test_images.npy   uint8 M x 28 x 28     test_labels.npy   uint8 M
    test_binarized.npy uint8 0/1 M x 28 x 28 (one fixed draw, so test scores are comparable)
    split_indices.npz  train, val: int64 row numbers into the raw training file
    stats.json         counts per class, pixel means, shapes, seeds
"""

from __future__ import annotations

import io
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from vae_core.atomic import atomic_write_bytes, atomic_write_text
from vae_core.data.errors import ProcessedDataError, SplitError
from vae_core.data.idx import IMAGE_SHAPE, NUM_CLASSES, validate_pair
from vae_core.data.sources import (
    dumps_json,
    fetch_raw,
    locate_raw_files,
    read_manifest,
    read_raw_arrays,
    replace_dir,
    staging_dir,
    verify_manifest,
)

PROCESSED_FORMAT_VERSION = 2  # 2: a holdout split for the promotion gate
SPLITS = ("train", "val", "holdout", "test")
#: Splits with a fixed binarized copy: every model is scored on the same bits.
BINARIZED = ("holdout", "test")
ARRAY_FILES: tuple[str, ...] = (
    *(f"{split}_{kind}" for split in SPLITS for kind in ("images", "labels")),
    *(f"{split}_binarized" for split in BINARIZED),
)
INDICES_FILE = "split_indices.npz"
STATS_FILE = "stats.json"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the DVC stages work on numpy arrays
# only, and importing torch costs seconds on a small CPU.


@dataclass(frozen=True)
class DatasetSplits:
    """The splits as CPU tensors: images uint8 ``N x 28 x 28``, labels int64 ``N``, and for
    holdout and test a fixed binarized copy, uint8 0/1 (every model is scored on the same bits).

    Each split has one job: train fits the weights, val drives early stopping and the sweep's
    choice, holdout (carved from the training data too) is what the promotion gate decides on,
    and test is only ever reported.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    holdout_images: torch.Tensor
    holdout_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    holdout_binarized: torch.Tensor
    test_binarized: torch.Tensor

    def __post_init__(self) -> None:
        import torch

        for split in SPLITS:
            images = getattr(self, f"{split}_images")
            labels = getattr(self, f"{split}_labels")
            if (
                images.dtype != torch.uint8
                or images.dim() != 3
                or tuple(images.shape[1:]) != (IMAGE_SHAPE)
            ):
                raise ProcessedDataError(
                    f"{split}_images: expected a uint8 tensor N x 28 x 28, found "
                    f"{images.dtype} {tuple(images.shape)}"
                )
            if labels.dtype != torch.int64 or labels.dim() != 1:
                raise ProcessedDataError(
                    f"{split}_labels: expected an int64 vector, found {labels.dtype} "
                    f"{tuple(labels.shape)}"
                )
            if labels.shape[0] != images.shape[0]:
                raise ProcessedDataError(
                    f"{split}: expected as many labels as images, found {labels.shape[0]} "
                    f"labels and {images.shape[0]} images"
                )
        for split in BINARIZED:
            images, binarized = (
                getattr(self, f"{split}_images"),
                getattr(self, f"{split}_binarized"),
            )
            if binarized.shape != images.shape or binarized.dtype != torch.uint8:
                raise ProcessedDataError(
                    f"{split}_binarized: expected uint8 of shape {tuple(images.shape)}, "
                    f"found {binarized.dtype} {tuple(binarized.shape)}"
                )

    def arrays(self) -> dict[str, np.ndarray]:
        """The splits as numpy arrays in the on-disk layout (labels as uint8)."""
        out: dict[str, np.ndarray] = {}
        for name in ARRAY_FILES:
            array = getattr(self, name).detach().cpu().numpy()
            out[name] = array.astype(np.uint8) if name.endswith("_labels") else array
        return out

    def counts(self) -> dict[str, int]:
        """Number of images per split."""
        return {split: int(getattr(self, f"{split}_images").shape[0]) for split in SPLITS}


# --------------------------------------------------------------------------- raw -> arrays


def load_raw(
    raw_dir: str | os.PathLike[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and validate a raw folder: ``(train_images, train_labels, test_images, test_labels)``.

    When the folder holds a ``manifest.json`` (as ``fetch_raw`` writes), each file's sha256 is
    checked against it, so a file edited after the fetch is caught here.
    """
    paths = locate_raw_files(raw_dir)
    verify_manifest(raw_dir, paths)
    arrays = read_raw_arrays(paths)
    return (
        arrays["train_images"],
        arrays["train_labels"],
        arrays["test_images"],
        arrays["test_labels"],
    )


def split_arrays(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    val_size: int,
    split_seed: int,
    binarize_seed: int,
    holdout_size: int = 0,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The numpy core of ``make_splits``: arrays keyed like the processed files, and indices.

    A seeded permutation of the training rows gives the validation set (its first
    ``val_size``), then the holdout (the next ``holdout_size``), then the training set. The
    binarized test and holdout sets are Bernoulli draws from their own seed, fixed so every
    model sees the same bits (the test draw comes first, so it does not depend on the holdout).
    The seeds are validated once, where the params are read; the sizes are checked here
    because whether they fit depends on the data.
    """
    validate_pair(train_images, train_labels, "train images", "train labels")
    validate_pair(test_images, test_labels, "test images", "test labels")
    n = int(train_images.shape[0])
    if (
        isinstance(val_size, bool)
        or not isinstance(val_size, int | np.integer)
        or not (1 <= val_size <= n - 1 - holdout_size)
    ):
        raise SplitError(
            f"data.val_size = {val_size!r} and data.holdout_size = {holdout_size!r} do not fit "
            f"the training set of {n} images: expected val_size + holdout_size from 1 to "
            f"{n - 1} (at least one image must remain for training)"
        )
    perm = np.random.default_rng(split_seed).permutation(n)
    cut = int(val_size) + int(holdout_size)
    rows = {
        "val": np.sort(perm[: int(val_size)]).astype(np.int64),
        "holdout": np.sort(perm[int(val_size) : cut]).astype(np.int64),
        "train": np.sort(perm[cut:]).astype(np.int64),
    }
    arrays = {}
    for split, idx in rows.items():
        arrays[f"{split}_images"] = train_images[idx]
        arrays[f"{split}_labels"] = train_labels[idx]
    arrays["test_images"] = np.ascontiguousarray(test_images)
    arrays["test_labels"] = np.ascontiguousarray(test_labels)
    rng = np.random.default_rng(binarize_seed)
    for split in ("test", "holdout"):  # this order: the test draw is as it always was
        images = arrays[f"{split}_images"]
        probs = images.astype(np.float32) / np.float32(255.0)
        draw = rng.random(images.shape, dtype=np.float32) < probs
        arrays[f"{split}_binarized"] = draw.astype(np.uint8)
    return {name: arrays[name] for name in ARRAY_FILES}, rows


def _to_splits(arrays: dict[str, np.ndarray]) -> DatasetSplits:
    import torch

    return DatasetSplits(
        **{
            name: torch.from_numpy(
                np.ascontiguousarray(a.astype(np.int64) if name.endswith("_labels") else a)
            )
            for name, a in arrays.items()
        }
    )


def make_splits(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    test_labels: np.ndarray,
    *,
    val_size: int,
    split_seed: int,
    binarize_seed: int,
    holdout_size: int = 0,
) -> tuple[DatasetSplits, dict[str, np.ndarray]]:
    """Carve a seeded validation set out of the training data and draw the fixed binarized test.

    Returns the splits and ``{"train": idx, "val": idx}``: sorted row numbers into the raw
    training arrays, so anyone can tell exactly which images were held out.
    """
    arrays, indices = split_arrays(
        train_images,
        train_labels,
        test_images,
        test_labels,
        val_size=val_size,
        split_seed=split_seed,
        binarize_seed=binarize_seed,
        holdout_size=holdout_size,
    )
    return _to_splits(arrays), indices


# --------------------------------------------------------------------------- on disk


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like ``np.savez`` but byte-for-byte reproducible (fixed zip timestamps), so DVC sees the
    same hash when nothing changed."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_EPOCH)
            info.external_attr = 0o644 << 16
            zf.writestr(info, _npy_bytes(arrays[key]))
    atomic_write_bytes(path, buf.getvalue())


def array_stats(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """Counts per class, pixel means (in [0, 1]) and shapes per split, for a quick look."""
    stats: dict[str, Any] = {
        "format_version": PROCESSED_FORMAT_VERSION,
        "counts": {},
        "class_counts": {},
        "pixel_mean": {},
        "shapes": {},
    }
    for split in SPLITS:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        stats["counts"][split] = int(images.shape[0])
        stats["class_counts"][split] = np.bincount(labels, minlength=NUM_CLASSES).tolist()
        mean = float(images.mean(dtype=np.float64)) / 255.0 if images.size else 0.0
        stats["pixel_mean"][split] = round(mean, 6)
        stats["shapes"][split] = list(images.shape)
    for split in BINARIZED:
        binarized = arrays[f"{split}_binarized"]
        mean = float(binarized.mean(dtype=np.float64)) if binarized.size else 0.0
        stats["pixel_mean"][f"{split}_binarized"] = round(mean, 6)
    return stats


def split_stats(splits: DatasetSplits) -> dict[str, Any]:
    """``array_stats`` of a ``DatasetSplits``."""
    return array_stats(splits.arrays())


def save_arrays(
    arrays: dict[str, np.ndarray],
    indices: dict[str, np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The numpy core of ``save_processed`` (the prepare stage calls it without torch)."""
    out = Path(out_dir)
    missing = [name for name in ARRAY_FILES if name not in arrays]
    if missing:
        raise ProcessedDataError(f"arrays to save: expected {list(ARRAY_FILES)}, missing {missing}")
    for key in ("train", "val", "holdout"):
        if key not in indices:
            raise ProcessedDataError(
                f"split indices: expected keys 'train', 'val' and 'holdout', found "
                f"{sorted(indices)}"
            )
    stats = array_stats(arrays)
    if extra_stats:
        stats.update(extra_stats)
    with staging_dir(out) as tmp:
        for name in ARRAY_FILES:
            array = arrays[name]
            if name.endswith("_labels"):
                array = array.astype(np.uint8)
            atomic_write_bytes(tmp / f"{name}.npy", _npy_bytes(array))
        _write_npz(
            tmp / INDICES_FILE, {k: np.asarray(v, dtype=np.int64) for k, v in indices.items()}
        )
        atomic_write_text(tmp / STATS_FILE, dumps_json(stats) + "\n")
        replace_dir(tmp, out)
    return stats


def save_processed(
    splits: DatasetSplits,
    indices: dict[str, np.ndarray],
    out_dir: str | os.PathLike[str],
    *,
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write the processed folder atomically (built in a temporary sibling, then renamed into
    place) and return the statistics written to ``stats.json``.

    ``extra_stats`` (for example the seeds) is merged into ``stats.json``.
    """
    return save_arrays(splits.arrays(), indices, out_dir, extra_stats=extra_stats)


def _load_npy(path: Path) -> np.ndarray:
    if not path.is_file():
        raise ProcessedDataError(
            f"{path}: missing: expected the processed file (run the prepare stage: "
            "`dvc repro prepare` or `python -m flows.stages prepare`)"
        )
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ProcessedDataError(
            f"{path}: expected a .npy array that loads without pickle, found unreadable "
            f"content ({exc})"
        ) from exc


def load_processed(processed_dir: str | os.PathLike[str]) -> DatasetSplits:
    """Load a folder written by ``save_processed`` (no pickle), checking dtypes and shapes."""
    folder = Path(processed_dir)
    if not folder.is_dir():
        raise ProcessedDataError(
            f"{folder}: expected a processed-data folder, found nothing (run the prepare stage)"
        )
    arrays = {name: _load_npy(folder / f"{name}.npy") for name in ARRAY_FILES}
    for split in SPLITS:
        validate_pair(
            arrays[f"{split}_images"],
            arrays[f"{split}_labels"],
            folder / f"{split}_images.npy",
            folder / f"{split}_labels.npy",
            allow_empty=split == "holdout",
        )
    for split in BINARIZED:
        binarized, images = arrays[f"{split}_binarized"], arrays[f"{split}_images"]
        if (
            binarized.dtype != np.uint8
            or binarized.shape != images.shape
            or (binarized.size and binarized.max() > 1)
        ):
            raise ProcessedDataError(
                f"{folder / f'{split}_binarized.npy'}: expected uint8 0/1 of shape "
                f"{images.shape}, found {binarized.dtype} {binarized.shape}"
            )
    return _to_splits(arrays)


def load_split_indices(processed_dir: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The train / val row numbers saved beside the processed arrays."""
    path = Path(processed_dir) / INDICES_FILE
    if not path.is_file():
        raise ProcessedDataError(f"{path}: missing: expected the split indices")
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError) as exc:  # object arrays refused, a damaged file
        raise ProcessedDataError(f"{path}: cannot read the split indices: {exc}") from exc


def load_splits(
    source: str,
    dataset: str = "mnist",
    *,
    val_size: int = 500,
    holdout_size: int = 0,
    split_seed: int = 0,
    binarize_seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> DatasetSplits:
    """Fetch ``source`` and split it in memory: the one-call path for ``vae-pipeline train``.

    With ``cache_dir`` the raw files are kept in ``cache_dir/<dataset>`` and reused while its
    manifest names the same source; otherwise they go to a temporary folder that is removed.
    """
    if cache_dir is not None:
        raw = Path(cache_dir) / dataset
        manifest = read_manifest(raw) if raw.is_dir() else None
        if (
            manifest is None
            or manifest.get("source") != source
            or (manifest.get("dataset") != dataset)
        ):
            fetch_raw(source, dataset, raw)
        arrays = load_raw(raw)
    else:
        with tempfile.TemporaryDirectory(prefix="vae-raw-") as tmp:
            raw = Path(tmp) / dataset
            fetch_raw(source, dataset, raw)
            arrays = load_raw(raw)
    splits, _ = make_splits(
        *arrays,
        val_size=val_size,
        holdout_size=holdout_size,
        split_seed=split_seed,
        binarize_seed=binarize_seed,
    )
    return splits
