"""Data sources: embedded subset, local folders, the downloader (faked), retries, atomicity."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from vae_core.data import (
    ChecksumError,
    DatasetMismatchError,
    FetchError,
    IdxFormatError,
    SourceError,
    fetch_raw,
    read_idx,
)
from vae_core.data import sources as src
from vae_core.data.idx import encode_idx, write_idx

RAW_NAMES = sorted(src.RAW_FILES.values())


def no_temp_leftovers(parent: Path) -> bool:
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


# --------------------------------------------------------------------------- embedded


def test_embedded_source_is_stratified_4000_1000(embedded_raw: Path) -> None:
    manifest = json.loads((embedded_raw / "manifest.json").read_text())
    assert manifest["dataset"] == "mnist" and manifest["source"] == "embedded"
    assert manifest["counts"] == {"train": 4000, "test": 1000}
    assert manifest["label_counts"]["train"] == [400] * 10
    assert manifest["label_counts"]["test"] == [100] * 10
    assert sorted(p.name for p in embedded_raw.iterdir()) == sorted([*RAW_NAMES, "manifest.json"])
    for name, entry in manifest["files"].items():
        data = (embedded_raw / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
        assert entry["bytes"] == len(data)
    images = read_idx(embedded_raw / "train-images-idx3-ubyte.gz")
    assert images.shape == (4000, 28, 28) and images.dtype == np.uint8
    assert images.max() == 255 and images.min() == 0  # real grey levels, not rescaled


def test_embedded_source_is_deterministic(embedded_raw: Path, tmp_path: Path, digest) -> None:
    manifest = fetch_raw("embedded", "mnist", tmp_path / "again")
    assert manifest == json.loads((embedded_raw / "manifest.json").read_text())
    assert digest(tmp_path / "again") == digest(embedded_raw)


def test_embedded_only_holds_mnist(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="'embedded' holds MNIST digits only.*'kmnist'"):
        fetch_raw("embedded", "kmnist", tmp_path / "out", retries=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (",".join(["0"] * 783 + ["x", "3"]), r"row 2, column 784: expected a number, found 'x'"),
        ("1,2", r"row 2: expected 785 comma-separated values.*found 2"),
        ("LABEL", r"row 2: expected 785 comma-separated values"),
    ],
)
def test_embedded_csv_rows_are_checked(tmp_path: Path, row: str, message: str) -> None:
    good = ",".join(["0"] * 784 + ["3"])
    path = tmp_path / "mnist.csv.gz"
    path.write_bytes(gzip.compress(f"{good}\n{row}\n{good}\n".encode()))
    with pytest.raises(SourceError, match=message):
        src.read_embedded_csv(path)


@pytest.mark.parametrize(
    ("pixel", "label", "message"),
    [
        ("300", "3", r"row 2: expected pixel values 0..255, found values 0..300"),
        ("0", "12", r"row 2: expected a label 0..9 in the last column, found label 12"),
        ("0.5", "3", r"row 2: expected whole numbers, found a fraction"),
    ],
)
def test_embedded_csv_values_are_checked(
    tmp_path: Path, pixel: str, label: str, message: str
) -> None:
    good = ",".join(["0"] * 784 + ["3"])
    bad = ",".join(["0"] * 783 + [pixel, label])
    path = tmp_path / "mnist.csv"
    path.write_text(f"{good}\n{bad}\n")
    with pytest.raises(SourceError, match=message):
        src.read_embedded_csv(path)


def test_stratified_split_needs_enough_per_class() -> None:
    labels = np.repeat(np.arange(10), 5).astype(np.uint8)
    with pytest.raises(SourceError, match="at least 6 examples of class 0.*found 5"):
        src.stratified_split(labels, 4, 2)


# --------------------------------------------------------------------------- folders


@pytest.mark.parametrize("gz", [True, False])
def test_folder_source(tmp_path: Path, write_raw, gz: bool) -> None:
    arrays = write_raw(tmp_path / "src", 120, 40, gz=gz)
    manifest = fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")
    assert manifest["counts"] == {"train": 120, "test": 40}
    assert manifest["label_counts"]["train"] == [12] * 10
    assert sorted(p.name for p in (tmp_path / "raw").iterdir()) == sorted(
        [*RAW_NAMES, "manifest.json"]
    )
    for key, name in src.RAW_FILES.items():
        np.testing.assert_array_equal(read_idx(tmp_path / "raw" / name), arrays[key])
        if gz:  # .gz files are copied byte for byte
            assert (tmp_path / "raw" / name).read_bytes() == (tmp_path / "src" / name).read_bytes()


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"nowhere does not exist: expected a folder holding"):
        fetch_raw(str(tmp_path / "nowhere"), "mnist", tmp_path / "raw")


def test_misspelled_named_source_is_reported_as_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match=r"embeded does not exist.*named sources embedded"):
        fetch_raw("embeded", "mnist", tmp_path / "raw")


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"empty is empty: expected a folder holding"):
        fetch_raw(str(tmp_path / "empty"), "mnist", tmp_path / "raw")


def test_folder_missing_a_file(tmp_path: Path, write_raw) -> None:
    write_raw(tmp_path / "src")
    (tmp_path / "src" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SourceError, match=r"lacks t10k-labels-idx1-ubyte.gz.*found: t10k-images"):
        fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")


def test_source_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(SourceError, match="is not a folder"):
        fetch_raw(str(tmp_path / "f"), "mnist", tmp_path / "raw")


def test_symlink_escaping_the_folder_is_refused(tmp_path: Path, write_raw) -> None:
    write_raw(tmp_path / "outside")
    write_raw(tmp_path / "src")
    link = tmp_path / "src" / "train-images-idx3-ubyte.gz"
    link.unlink()
    link.symlink_to(tmp_path / "outside" / "train-images-idx3-ubyte.gz")
    with pytest.raises(SourceError, match=r"symlink that resolves outside the source folder"):
        fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")


def test_symlink_inside_the_folder_is_fine(tmp_path: Path, write_raw) -> None:
    write_raw(tmp_path / "src")
    (tmp_path / "src" / "store").mkdir()
    name = "train-images-idx3-ubyte.gz"
    os.replace(tmp_path / "src" / name, tmp_path / "src" / "store" / name)
    (tmp_path / "src" / name).symlink_to(Path("store") / name)
    assert fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")["counts"]["train"] == 120


def test_unknown_dataset(tmp_path: Path, write_raw) -> None:
    write_raw(tmp_path / "src")
    with pytest.raises(SourceError, match=r"unknown dataset 'cifar'.*mnist, fashion-mnist, kmnist"):
        fetch_raw(str(tmp_path / "src"), "cifar", tmp_path / "raw")


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("truncate", IdxFormatError, r"train-images-idx3-ubyte.gz: truncated"),
        ("magic", IdxFormatError, r"train-images-idx3-ubyte.gz: wrong magic number"),
        ("count", DatasetMismatchError, r"counts disagree"),
        ("label", DatasetMismatchError, r"t10k-labels-idx1-ubyte.gz: labels out of range"),
    ],
)
def test_bad_folder_leaves_previous_dest_untouched(
    tmp_path: Path, write_raw, digest, damage: str, error: type, message: str
) -> None:
    dest = tmp_path / "raw"
    write_raw(tmp_path / "good")
    fetch_raw(str(tmp_path / "good"), "mnist", dest)
    before = digest(dest)
    bad = tmp_path / "bad"
    arrays = write_raw(bad)
    images = bad / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-200])
    elif damage == "magic":
        images.write_bytes(gzip.compress(b"\x12\x34" + encode_idx(arrays["train_images"])[2:]))
    elif damage == "count":
        write_idx(bad / "train-labels-idx1-ubyte.gz", arrays["train_labels"][:-1])
    else:
        labels = arrays["test_labels"].copy()
        labels[3] = 11
        write_idx(bad / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(error, match=message):
        fetch_raw(str(bad), "mnist", dest)
    assert digest(dest) == before
    assert no_temp_leftovers(tmp_path)


def test_official_sized_files_must_match_published_md5(
    tmp_path: Path, write_raw, monkeypatch
) -> None:
    # Pretend 120/40 are the official counts so the check applies to a small folder.
    monkeypatch.setattr(src, "OFFICIAL_COUNTS", {"train": 120, "test": 40})
    write_raw(tmp_path / "src")
    real = {n: src.file_digest(tmp_path / "src" / n, "md5") for n in RAW_NAMES}
    monkeypatch.setattr(src, "published_md5", lambda dataset: dict(real))
    fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")  # all sums match

    wrong = dict(real, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setattr(src, "published_md5", lambda dataset: wrong)
    before = (tmp_path / "raw" / "manifest.json").read_bytes()
    with pytest.raises(
        ChecksumError,
        match=r"t10k-images-idx3-ubyte.gz: md5 checksum mismatch.*expected 0{32}.*found "
        + real["t10k-images-idx3-ubyte.gz"],
    ):
        fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")
    assert (tmp_path / "raw" / "manifest.json").read_bytes() == before


def test_uncompressed_official_files_skip_the_gz_md5(tmp_path: Path, write_raw, monkeypatch):
    monkeypatch.setattr(src, "OFFICIAL_COUNTS", {"train": 120, "test": 40})
    monkeypatch.setattr(src, "published_md5", lambda dataset: {n: "0" * 32 for n in RAW_NAMES})
    write_raw(tmp_path / "src", gz=False)
    assert fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")["counts"]["test"] == 40


def test_published_md5_comes_from_torchvision() -> None:
    md5 = src.published_md5("mnist")
    assert md5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert sorted(md5) == RAW_NAMES
    assert sorted(src.published_md5("kmnist")) == RAW_NAMES  # URLs reduced to file names


# --------------------------------------------------------------------------- retries


def flaky_source(failures: int, write_raw, calls: list[int]):
    def fetch(dataset: str, staging: Path) -> None:
        calls.append(1)
        (staging / "partial-junk").write_text("left by a failed attempt")
        if len(calls) <= failures:
            raise ConnectionError(f"network down (attempt {len(calls)})")
        (staging / "partial-junk").unlink()
        write_raw(staging)

    return fetch


def test_source_that_fails_twice_is_retried_with_backoff(tmp_path: Path, write_raw) -> None:
    calls: list[int] = []
    sleeps: list[float] = []
    manifest = fetch_raw(
        "flaky",
        "mnist",
        tmp_path / "raw",
        retries=3,
        backoff_s=0.01,
        sources={"flaky": flaky_source(2, write_raw, calls)},
        sleep=sleeps.append,
    )
    assert len(calls) == 3
    assert sleeps == pytest.approx([0.01, 0.02])  # exponential backoff
    assert manifest["source"] == "flaky" and manifest["counts"]["train"] == 120
    assert not (tmp_path / "raw" / "partial-junk").exists()


def test_real_sleep_is_used_by_default(tmp_path: Path, write_raw) -> None:
    calls: list[int] = []
    src.SOURCES["flaky-test"] = flaky_source(1, write_raw, calls)
    try:
        fetch_raw("flaky-test", "mnist", tmp_path / "raw", retries=1, backoff_s=0.001)
    finally:
        del src.SOURCES["flaky-test"]
    assert len(calls) == 2


def test_permanent_failure_leaves_previous_dest_untouched(
    tmp_path: Path, write_raw, digest
) -> None:
    dest = tmp_path / "raw"
    write_raw(tmp_path / "good")
    fetch_raw(str(tmp_path / "good"), "mnist", dest)
    before = digest(dest)
    calls: list[int] = []
    with pytest.raises(FetchError, match=r"failed after 3 attempt\(s\).*network down"):
        fetch_raw(
            "flaky",
            "mnist",
            dest,
            retries=2,
            backoff_s=0.0,
            sources={"flaky": flaky_source(99, write_raw, calls)},
        )
    assert len(calls) == 3
    assert digest(dest) == before
    assert no_temp_leftovers(tmp_path)


def test_data_errors_are_not_retried(tmp_path: Path) -> None:
    calls: list[int] = []

    def bad(dataset: str, staging: Path) -> None:
        calls.append(1)
        raise SourceError("the data itself is wrong")

    with pytest.raises(SourceError, match="itself is wrong"):
        fetch_raw("bad", "mnist", tmp_path / "raw", sources={"bad": bad}, sleep=lambda s: None)
    assert calls == [1]


def test_source_writing_garbage_is_validated(tmp_path: Path) -> None:
    def garbage(dataset: str, staging: Path) -> None:
        for name in RAW_NAMES:
            (staging / name).write_bytes(b"<html>rate limited</html>")

    with pytest.raises(IdxFormatError, match="wrong magic number"):
        fetch_raw("g", "mnist", tmp_path / "raw", sources={"g": garbage})
    assert not (tmp_path / "raw").exists()


def test_retrying_helper() -> None:
    sleeps: list[float] = []
    attempts = iter([OSError("a"), RuntimeError("b"), "ok"])

    def fn() -> str:
        item = next(attempts)
        if isinstance(item, Exception):
            raise item
        return item

    assert src.retrying(fn, 2, 0.5, sleep=sleeps.append) == "ok"
    assert sleeps == [0.5, 1.0]
    with pytest.raises(ValueError, match="retries must be >= 0"):
        src.retrying(fn, -1, 0.5)


# --------------------------------------------------------------------------- download (faked)


def test_download_source_copies_torchvision_raw_files(
    tmp_path: Path, write_raw, monkeypatch
) -> None:
    import torchvision.datasets as tvd

    created: list[tuple[str, bool]] = []

    class FakeKMNIST:
        resources = tvd.KMNIST.resources

        def __init__(self, root: str, train: bool, download: bool) -> None:
            created.append((root, download))
            self.raw_folder = os.path.join(root, "KMNIST", "raw")
            write_raw(Path(self.raw_folder))

    monkeypatch.setattr(tvd, "KMNIST", FakeKMNIST)
    manifest = fetch_raw("download", "kmnist", tmp_path / "raw", retries=0)
    assert manifest["dataset"] == "kmnist" and manifest["counts"] == {"train": 120, "test": 40}
    assert created and created[0][1] is True
    assert not Path(created[0][0]).exists()  # the temporary root is cleaned up


def test_download_failure_is_retried_then_reported(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets as tvd

    class Broken:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "FashionMNIST", Broken)
    monkeypatch.setattr(src.time, "sleep", lambda s: None)
    with pytest.raises(FetchError, match=r"fashion-mnist.*'download' failed after 2 attempt"):
        fetch_raw("download", "fashion-mnist", tmp_path / "raw", retries=1, backoff_s=5.0)


def test_folder_files_are_judged_by_content_not_name(tmp_path: Path, write_raw) -> None:
    arrays = write_raw(tmp_path / "src")
    for name in RAW_NAMES:  # raw bytes under .gz names
        f = tmp_path / "src" / name
        f.write_bytes(gzip.decompress(f.read_bytes()))
    fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")
    for key, name in src.RAW_FILES.items():
        assert (tmp_path / "raw" / name).read_bytes()[:2] == b"\x1f\x8b"
        np.testing.assert_array_equal(read_idx(tmp_path / "raw" / name), arrays[key])
