"""Data sources: embedded subset, local folders, the downloader (faked), transient failures
versus bad input, atomicity."""

import gzip
import hashlib
import json
import os
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from helpers import tree_digest, write_idx_folder

from vae_core.data import SourceError, SourceUnavailable, fetch_raw, read_idx
from vae_core.data import sources as src
from vae_core.data.errors import ChecksumError, DataError, DatasetMismatchError, IdxFormatError
from vae_core.data.idx import encode_idx, write_idx

RAW_NAMES = sorted(src.RAW_FILES.values())


def no_temp_leftovers(parent: Path) -> bool:
    return not [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_embedded_source_is_stratified_4000_1000_and_deterministic(embedded_raw, tmp_path):
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
    assert fetch_raw("embedded", "mnist", tmp_path / "again") == manifest
    assert tree_digest(tmp_path / "again") == tree_digest(embedded_raw)


def _row(*last: str) -> str:
    """A CSV row of 783 zero pixels and then ``last``."""
    return ",".join(["0"] * 783 + list(last))


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (_row("x", "3"), r"row 2, column 784: expected a number, found 'x'"),
        ("1,2", r"row 2: expected 785 comma-separated values.*found 2"),
        ("LABEL", r"row 2: expected 785 comma-separated values"),
        (_row("300", "3"), r"row 2: expected pixel values 0..255, found values 0..300"),
        (_row("0", "12"), r"row 2: expected a label 0..9 in the last column, found label 12"),
        (_row("0.5", "3"), r"row 2: expected whole numbers, found a fraction"),
    ],
)
def test_embedded_csv_rows_are_checked(tmp_path: Path, row: str, message: str) -> None:
    text = f"{_row('0', '3')}\n{row}\n{_row('0', '3')}\n".encode()
    for name, data in (("mnist.csv.gz", gzip.compress(text)), ("mnist.csv", text)):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(SourceError, match=message):
            src.read_embedded_csv(tmp_path / name)


def test_stratified_split_needs_enough_per_class() -> None:
    labels = np.repeat(np.arange(10), 5).astype(np.uint8)
    with pytest.raises(SourceError, match="at least 6 examples of class 0.*found 5"):
        src.stratified_split(labels, 4, 2)


@pytest.mark.parametrize("variant", ["gz", "raw", "raw-under-gz-names"])
def test_folder_source(tmp_path: Path, variant: str) -> None:
    """Files are judged by content, not name; the copy is always gzip (.gz files byte for
    byte)."""
    arrays = write_idx_folder(tmp_path / "src", 120, 40, gz=variant != "raw")
    if variant == "raw-under-gz-names":
        for name in RAW_NAMES:
            f = tmp_path / "src" / name
            f.write_bytes(gzip.decompress(f.read_bytes()))
    manifest = fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")
    assert manifest["counts"] == {"train": 120, "test": 40}
    assert manifest["label_counts"]["train"] == [12] * 10
    names = sorted(p.name for p in (tmp_path / "raw").iterdir())
    assert names == sorted([*RAW_NAMES, "manifest.json"])
    for key, name in src.RAW_FILES.items():
        out = tmp_path / "raw" / name
        np.testing.assert_array_equal(read_idx(out), arrays[key])
        assert out.read_bytes()[:2] == b"\x1f\x8b"
        if variant == "gz":
            assert out.read_bytes() == (tmp_path / "src" / name).read_bytes()


def _lacks_a_file(folder: Path) -> None:
    write_idx_folder(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()


def _escaping_link(folder: Path) -> None:
    write_idx_folder(folder.parent / "outside")
    write_idx_folder(folder)
    link = folder / "train-images-idx3-ubyte.gz"
    link.unlink()
    link.symlink_to(folder.parent / "outside" / link.name)


#: id: (prepare the folder (Path.exists: nothing), the source (None: that folder), the dataset,
#: the refusal)
REFUSED = {
    "missing": (Path.exists, None, "mnist", r"src does not exist: expected a folder holding"),
    "misspelled": (Path.exists, "embeded", "mnist",
                   r"embeded does not exist.*named sources embedded"),
    "empty": (Path.mkdir, None, "mnist", r"src is empty: expected a folder holding"),
    "a-file": (lambda f: f.write_text("x"), None, "mnist", "is not a folder"),
    "lacks-a-file": (_lacks_a_file, None, "mnist",
                     r"lacks t10k-labels-idx1-ubyte.gz.*found: t10k-images"),
    "escaping-link": (_escaping_link, None, "mnist",
                      r"symlink that resolves outside the source folder"),
    "unknown-dataset": (write_idx_folder, None, "cifar",
                        r"unknown dataset 'cifar'.*mnist, fashion-mnist, kmnist"),
    "embedded-kmnist": (Path.exists, "embedded", "kmnist",
                        r"'embedded' holds MNIST digits only.*'kmnist'"),
}  # fmt: skip


@pytest.mark.parametrize(("prepare", "source", "dataset", "message"), REFUSED.values(), ids=REFUSED)
def test_a_bad_source_is_refused_before_anything_is_written(
    tmp_path: Path, prepare, source, dataset, message
) -> None:
    prepare(tmp_path / "src")
    with pytest.raises(SourceError, match=message):
        fetch_raw(source or str(tmp_path / "src"), dataset, tmp_path / "raw")
    assert not (tmp_path / "raw").exists() and no_temp_leftovers(tmp_path)


def test_symlink_inside_the_folder_is_fine(tmp_path: Path) -> None:
    write_idx_folder(tmp_path / "src")
    (tmp_path / "src" / "store").mkdir()
    name = "train-images-idx3-ubyte.gz"
    os.replace(tmp_path / "src" / name, tmp_path / "src" / "store" / name)
    (tmp_path / "src" / name).symlink_to(Path("store") / name)
    assert fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")["counts"]["train"] == 120


def test_official_sized_gz_files_must_match_published_md5(tmp_path: Path, monkeypatch) -> None:
    # Pretend 120/40 are the official counts so the check applies to a small folder.
    monkeypatch.setattr(src, "OFFICIAL_COUNTS", {"train": 120, "test": 40})
    write_idx_folder(tmp_path / "src")
    real = {n: src.file_digest(tmp_path / "src" / n, "md5") for n in RAW_NAMES}
    monkeypatch.setattr(src, "published_md5", lambda dataset: dict(real))
    manifest = fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")  # all sums match
    assert manifest["counts"] == {"train": 120, "test": 40}

    wrong = dict(real, **{"t10k-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setattr(src, "published_md5", lambda dataset: wrong)
    before = (tmp_path / "raw" / "manifest.json").read_bytes()
    found = real["t10k-images-idx3-ubyte.gz"]
    mismatch = rf"t10k-images-idx3-ubyte.gz: md5 checksum mismatch.*expected 0{{32}}.*found {found}"
    with pytest.raises(ChecksumError, match=mismatch):
        fetch_raw(str(tmp_path / "src"), "mnist", tmp_path / "raw")
    assert (tmp_path / "raw" / "manifest.json").read_bytes() == before
    # Uncompressed files have no published md5 to match: the gz sums are skipped.
    write_idx_folder(tmp_path / "plain", gz=False)
    assert fetch_raw(str(tmp_path / "plain"), "mnist", tmp_path / "raw2")["counts"]["test"] == 40


def test_published_md5_comes_from_torchvision() -> None:
    md5 = src.published_md5("mnist")
    assert md5["train-images-idx3-ubyte.gz"] == "f68b3c2dcbeaaa9fbdd348bbdeb94873"
    assert sorted(md5) == RAW_NAMES
    assert sorted(src.published_md5("kmnist")) == RAW_NAMES  # URLs reduced to file names


def failing_source(exc: BaseException, calls: list[int]):
    """A named source that writes half a file, then fails with ``exc``."""

    def fetch(dataset: str, staging: Path) -> None:
        calls.append(1)
        (staging / src.RAW_FILES["train_images"]).write_bytes(b"half a download")
        raise exc

    return fetch


@pytest.mark.parametrize(
    ("damage", "error", "message"),
    [
        ("truncate", IdxFormatError, r"train-images-idx3-ubyte.gz: truncated"),
        ("magic", IdxFormatError, r"train-images-idx3-ubyte.gz: wrong magic number"),
        ("count", DatasetMismatchError, r"counts disagree"),
        ("label", DatasetMismatchError, r"t10k-labels-idx1-ubyte.gz: labels out of range"),
        ("unreachable", SourceUnavailable, r"^fetching mnist from source 'down' failed: "
         r"ConnectionResetError: connection reset by peer \(transient: worth trying again\)$"),
    ],
)  # fmt: skip
def test_a_failed_fetch_keeps_the_previous_dest_and_leaves_no_litter(
    tmp_path: Path, damage: str, error: type, message: str
) -> None:
    """A bad folder is bad input (a DataError); an unreachable source is tried once (retrying
    is the orchestrator's job) and is not a DataError, so the stage does not call it bad input."""
    dest = tmp_path / "raw"
    write_idx_folder(tmp_path / "good")
    fetch_raw(str(tmp_path / "good"), "mnist", dest)
    before = tree_digest(dest)
    bad, calls = tmp_path / "bad", []
    arrays = write_idx_folder(bad)
    images = bad / "train-images-idx3-ubyte.gz"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-200])
    elif damage == "magic":
        images.write_bytes(gzip.compress(b"\x12\x34" + encode_idx(arrays["train_images"])[2:]))
    elif damage == "count":
        write_idx(bad / "train-labels-idx1-ubyte.gz", arrays["train_labels"][:-1])
    elif damage == "label":
        labels = arrays["test_labels"].copy()
        labels[3] = 11
        write_idx(bad / "t10k-labels-idx1-ubyte.gz", labels)
    down = failing_source(ConnectionResetError("connection reset by peer"), calls)
    source = "down" if damage == "unreachable" else str(bad)
    with pytest.raises(error, match=message) as info:
        fetch_raw(source, "mnist", dest, sources={"down": down})
    assert isinstance(info.value, DataError) == (damage != "unreachable")
    assert calls == ([1] if damage == "unreachable" else [])
    assert tree_digest(dest) == before
    assert no_temp_leftovers(tmp_path)


@pytest.mark.parametrize(
    ("status", "error"),
    [(503, SourceUnavailable), (500, SourceUnavailable), (429, SourceUnavailable),
     (404, SourceError), (403, SourceError)],
)  # fmt: skip
def test_http_status_decides_transient_or_bad_input(tmp_path: Path, status: int, error) -> None:
    url = "http://mirror.invalid/t10k-images-idx3-ubyte.gz"
    refused = urllib.error.HTTPError(url, status, "answer", {}, None)
    calls: list[int] = []
    with pytest.raises(error, match=f"HTTP.*{status}") as info:
        fetch_raw("m", "mnist", tmp_path / "raw", sources={"m": failing_source(refused, calls)})
    assert isinstance(info.value, DataError) == (error is SourceError)
    assert calls == [1] and not (tmp_path / "raw").exists()


def test_data_errors_pass_through_and_garbage_is_validated(tmp_path: Path) -> None:
    calls: list[int] = []
    wrong = failing_source(SourceError("the data itself is wrong"), calls)
    with pytest.raises(SourceError, match="itself is wrong"):
        fetch_raw("bad", "mnist", tmp_path / "raw", sources={"bad": wrong})
    assert calls == [1]

    def garbage(dataset: str, staging: Path) -> None:
        for name in RAW_NAMES:
            (staging / name).write_bytes(b"<html>rate limited</html>")

    with pytest.raises(IdxFormatError, match="wrong magic number"):
        fetch_raw("g", "mnist", tmp_path / "raw", sources={"g": garbage})
    assert not (tmp_path / "raw").exists()


def test_download_source_copies_torchvision_raw_files_and_a_failure_is_transient(
    tmp_path: Path, monkeypatch
) -> None:
    created: list[tuple[str, bool]] = []

    class FakeKMNIST:
        resources = tvd.KMNIST.resources

        def __init__(self, root: str, train: bool, download: bool) -> None:
            created.append((root, download))
            self.raw_folder = os.path.join(root, "KMNIST", "raw")
            write_idx_folder(Path(self.raw_folder))

    class Broken:
        def __init__(self, *args, **kwargs) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(tvd, "KMNIST", FakeKMNIST)
    monkeypatch.setattr(tvd, "FashionMNIST", Broken)
    manifest = fetch_raw("download", "kmnist", tmp_path / "raw")
    assert manifest["dataset"] == "kmnist" and manifest["counts"] == {"train": 120, "test": 40}
    assert created and created[0][1] is True
    assert not Path(created[0][0]).exists()  # the temporary root is cleaned up
    failed = r"fashion-mnist from source 'download' failed: RuntimeError: Error downloading"
    with pytest.raises(SourceUnavailable, match=failed):
        fetch_raw("download", "fashion-mnist", tmp_path / "raw2")
