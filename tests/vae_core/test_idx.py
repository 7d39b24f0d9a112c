"""IDX reading and writing: round trips, and a clear refusal for each way a file can be wrong."""

from __future__ import annotations

import gzip
import struct
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from vae_core.data import DataError, DatasetMismatchError, IdxFormatError
from vae_core.data.idx import encode_idx, is_gzip, read_idx, validate_pair, write_idx


def images_labels(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return (
        rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
        (np.arange(n) % 10).astype(np.uint8),
    )


def header(code: int, *dims: int) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", ["x-idx3-ubyte.gz", "x-idx3-ubyte"])
def test_round_trip_images_and_labels(tmp_path: Path, name: str) -> None:
    images, labels = images_labels()
    write_idx(tmp_path / name, images)
    write_idx(tmp_path / ("l" + name), labels)
    assert is_gzip(tmp_path / name) == name.endswith(".gz")
    np.testing.assert_array_equal(read_idx(tmp_path / name), images)
    np.testing.assert_array_equal(read_idx(tmp_path / ("l" + name)), labels)
    assert read_idx(tmp_path / name).dtype == np.uint8


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_round_trip_other_idx_dtypes(tmp_path: Path, dtype: type) -> None:
    array = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
    write_idx(tmp_path / "a.gz", array)
    back = read_idx(tmp_path / "a.gz")
    assert back.dtype == np.dtype(dtype)  # native byte order again
    np.testing.assert_array_equal(back, array)


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    images, _ = images_labels()
    (tmp_path / "gz-without-suffix").write_bytes(gzip.compress(encode_idx(images)))
    (tmp_path / "raw-with-suffix.gz").write_bytes(encode_idx(images))
    np.testing.assert_array_equal(read_idx(tmp_path / "gz-without-suffix"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-with-suffix.gz"), images)


def test_gzip_output_is_deterministic(tmp_path: Path, monkeypatch) -> None:
    images, _ = images_labels()
    write_idx(tmp_path / "a.gz", images)
    # gzip would embed the current time if we let it: move the clock
    monkeypatch.setattr(gzip.time, "time", lambda: 1e9)
    write_idx(tmp_path / "b" / "a.gz", images)
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b" / "a.gz").read_bytes()


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path: Path, monkeypatch) -> None:
    images, _ = images_labels()
    target = tmp_path / "a.gz"
    write_idx(target, images)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("vae_core.atomic.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_idx(target, images[:3])
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.gz"]


# --------------------------------------------------------------------------- corrupt files


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x08\x03\x00\x00" + b"\x00" * 100)
    with pytest.raises(IdxFormatError, match=r"wrong magic number.*expected.*0x00 0x00.*found"):
        read_idx(path)
    with pytest.raises(IdxFormatError, match=str(path)):
        read_idx(path)


def test_png_is_not_idx(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(IdxFormatError, match="wrong magic"):
        read_idx(path)


def test_unknown_dtype_code(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(header(0x0A, 2) + b"\x00\x00"))
    with pytest.raises(IdxFormatError, match=r"unknown IDX dtype code 0x0A.*expected one of.*0x08"):
        read_idx(path)


def test_zero_dimensions(tmp_path: Path) -> None:
    path = tmp_path / "x"
    path.write_bytes(bytes([0, 0, 8, 0]))
    with pytest.raises(IdxFormatError, match="number of dimensions.*found 0"):
        read_idx(path)


def test_absurd_dimensions_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(header(0x08, 4_000_000_000, 28, 28) + b"\x00" * 100))
    tracemalloc.start()
    try:
        with pytest.raises(IdxFormatError, match=r"absurd dimensions.*expected at most"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000


def test_limit_is_configurable(tmp_path: Path) -> None:
    images, _ = images_labels()
    write_idx(tmp_path / "a", images)
    with pytest.raises(IdxFormatError, match="absurd"):
        read_idx(tmp_path / "a", max_bytes=100)


def test_truncated_gzip(tmp_path: Path) -> None:
    images, _ = images_labels(200)
    good = gzip.compress(encode_idx(images))
    path = tmp_path / "t.gz"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(IdxFormatError, match=r"truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_gzip_missing_only_its_trailer(tmp_path: Path) -> None:
    images, _ = images_labels()
    good = gzip.compress(encode_idx(images))
    path = tmp_path / "t.gz"
    path.write_bytes(good[:-8])  # CRC and length gone, payload complete
    with pytest.raises(IdxFormatError, match="truncated or corrupt gzip"):
        read_idx(path)


def test_corrupt_gzip_body(tmp_path: Path) -> None:
    images, _ = images_labels(50)
    data = bytearray(gzip.compress(encode_idx(images)))
    data[len(data) // 2] ^= 0xFF
    path = tmp_path / "c.gz"
    path.write_bytes(bytes(data))
    with pytest.raises(IdxFormatError, match=str(path)):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_payload(tmp_path: Path, compress: bool) -> None:
    images, _ = images_labels()
    data = encode_idx(images)[:-100]
    path = tmp_path / "p"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(IdxFormatError, match=r"truncated payload.*expected 7840 bytes, found only"):
        read_idx(path)


@pytest.mark.parametrize("compress", [False, True])
def test_trailing_bytes(tmp_path: Path, compress: bool) -> None:
    _, labels = images_labels()
    data = encode_idx(labels) + b"\x00"
    path = tmp_path / "l"
    path.write_bytes(gzip.compress(data) if compress else data)
    with pytest.raises(IdxFormatError, match="trailing bytes"):
        read_idx(path)


def test_gzip_bomb_refused_without_inflating_it(tmp_path: Path) -> None:
    # A header declaring one image, followed by 64 MB of zeros (about 64 kB compressed).
    path = tmp_path / "bomb.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = bytes(1 << 20)
    with open(path, "wb") as f:
        f.write(comp.compress(header(0x08, 1, 28, 28)))
        for _ in range(64):
            f.write(comp.compress(chunk))
        f.write(comp.flush())
    assert path.stat().st_size < 1_000_000
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(IdxFormatError, match="trailing bytes"):
            read_idx(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - start < 2.0
    assert peak < 5_000_000


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(IdxFormatError, match="missing or not a file"):
        read_idx(tmp_path / "nope.gz")


def test_errors_are_value_errors() -> None:
    assert issubclass(IdxFormatError, DataError)
    assert issubclass(DataError, ValueError)


def test_write_refuses_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(IdxFormatError, match="cannot write dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16))


# --------------------------------------------------------------------------- validate_pair


def test_validate_pair_accepts_mnist_shapes() -> None:
    validate_pair(*images_labels(), "i", "l")


def test_count_mismatch() -> None:
    images, labels = images_labels(10)
    with pytest.raises(
        DatasetMismatchError, match=r"counts disagree: img.gz holds 10 images, lab.gz holds 9"
    ):
        validate_pair(images, labels[:9], "img.gz", "lab.gz")


def test_labels_out_of_range() -> None:
    images, labels = images_labels(10)
    labels[7] = 10
    with pytest.raises(
        DatasetMismatchError,
        match=r"lab.gz: labels out of range: expected 0..9, found 10 at index 7",
    ):
        validate_pair(images, labels, "img.gz", "lab.gz")


@pytest.mark.parametrize(
    "images",
    [
        np.zeros((4, 28, 27), np.uint8),
        np.zeros((4, 784), np.uint8),
        np.zeros((4, 28, 28), np.float32),
    ],
)
def test_image_shape_and_dtype(images: np.ndarray) -> None:
    with pytest.raises(DatasetMismatchError, match=r"img.gz: expected images of shape N x 28 x 28"):
        validate_pair(images, np.zeros(4, np.uint8), "img.gz", "lab.gz")


def test_label_dtype() -> None:
    with pytest.raises(DatasetMismatchError, match="lab.gz: expected a 1-D uint8 label vector"):
        validate_pair(np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int32), "img.gz", "lab.gz")


def test_empty_split() -> None:
    with pytest.raises(DatasetMismatchError, match="at least one image"):
        validate_pair(np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8), "i", "l")
