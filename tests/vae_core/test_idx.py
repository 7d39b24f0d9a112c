"""IDX reading and writing: round trips, and a clear refusal for each way a file can be wrong."""

import gzip
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from vae_core.data import DataError, DatasetMismatchError, IdxFormatError
from vae_core.data.idx import encode_idx, is_gzip, read_idx, validate_pair, write_idx


def images_labels(n: int = 10) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return images, (np.arange(n) % 10).astype(np.uint8)


def header(code: int, *dims: int) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(struct.pack(">I", d) for d in dims)


def _peak_bytes_while_refused(path: Path, match: str) -> int:
    """read_idx(path) is refused with ``match``; the peak memory it traced meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(IdxFormatError, match=match):
            read_idx(path)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


ROUND_TRIPS = {
    "images.gz": images_labels()[0],
    "images-raw": images_labels()[0],
    "labels.gz": images_labels()[1],
    **{f"{np.dtype(t).name}.gz": (np.arange(24).reshape(2, 3, 4) - 5).astype(t)
       for t in (np.int8, np.int16, np.int32, np.float32, np.float64)},
}  # fmt: skip


@pytest.mark.parametrize("name", ROUND_TRIPS)
def test_round_trip(tmp_path: Path, name: str) -> None:
    write_idx(tmp_path / name, ROUND_TRIPS[name])
    assert is_gzip(tmp_path / name) == name.endswith(".gz")
    back = read_idx(tmp_path / name)
    assert back.dtype == ROUND_TRIPS[name].dtype  # native byte order again
    np.testing.assert_array_equal(back, ROUND_TRIPS[name])


def test_gzip_is_detected_by_content_not_name_and_its_output_is_deterministic(
    tmp_path: Path, monkeypatch
) -> None:
    images, _ = images_labels()
    (tmp_path / "gz-without-suffix").write_bytes(gzip.compress(encode_idx(images)))
    (tmp_path / "raw-with-suffix.gz").write_bytes(encode_idx(images))
    np.testing.assert_array_equal(read_idx(tmp_path / "gz-without-suffix"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw-with-suffix.gz"), images)
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


_IMAGES = encode_idx(images_labels()[0])
_LABELS = encode_idx(images_labels()[1])
_BIG = gzip.compress(encode_idx(images_labels(200)[0]))
_SMALL = bytearray(gzip.compress(encode_idx(images_labels(50)[0])))
_SMALL[len(_SMALL) // 2] ^= 0xFF
#: (id, the file's bytes, what the refusal must say besides the file's name)
CORRUPT = [
    ("wrong-magic", b"\x08\x03\x00\x00" + b"\x00" * 100,
     r"wrong magic number.*expected.*0x00 0x00.*found"),
    ("png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64, "wrong magic"),
    ("unknown-dtype", gzip.compress(header(0x0A, 2) + b"\x00\x00"),
     r"unknown IDX dtype code 0x0A.*expected one of.*0x08"),
    ("zero-dimensions", bytes([0, 0, 8, 0]), "number of dimensions.*found 0"),
    ("truncated-gzip", _BIG[: len(_BIG) // 2], "truncated"),
    ("gzip-without-trailer", gzip.compress(_IMAGES)[:-8], "truncated or corrupt gzip"),
    ("corrupt-gzip-body", bytes(_SMALL), None),
    ("truncated-payload", _IMAGES[:-100],
     r"truncated payload.*expected 7840 bytes, found only"),
    ("truncated-payload-gz", gzip.compress(_IMAGES[:-100]),
     r"truncated payload.*expected 7840 bytes, found only"),
    ("trailing-bytes", _LABELS + b"\x00", "trailing bytes"),
    ("trailing-bytes-gz", gzip.compress(_LABELS + b"\x00"), "trailing bytes"),
    ("missing", None, "missing or not a file"),
]  # fmt: skip


@pytest.mark.parametrize(("data", "match"), [c[1:] for c in CORRUPT], ids=[c[0] for c in CORRUPT])
def test_a_corrupt_file_is_refused_naming_the_file(tmp_path: Path, data: bytes, match):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    if data is not None:
        path.write_bytes(data)
    with pytest.raises(IdxFormatError, match=match) as refused:
        read_idx(path)
    assert str(path) in str(refused.value)


def test_unwritable_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IdxFormatError, match="cannot write dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.uint16))
    # Every refusal is a DataError, and so a ValueError for callers that know nothing more.
    assert issubclass(IdxFormatError, DataError) and issubclass(DataError, ValueError)


def test_absurd_dimensions_refused_before_allocation(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(header(0x08, 4_000_000_000, 28, 28) + b"\x00" * 100))
    assert _peak_bytes_while_refused(path, r"absurd dimensions.*expected at most") < 2_000_000
    write_idx(tmp_path / "a", images_labels()[0])  # 7,840 bytes of payload: the limit is ours
    with pytest.raises(IdxFormatError, match="absurd"):
        read_idx(tmp_path / "a", max_bytes=100)


def test_gzip_bomb_refused_without_inflating_it(tmp_path: Path, monkeypatch) -> None:
    # A header declaring one image, followed by 64 MB of zeros (about 64 kB compressed).
    path = tmp_path / "bomb.gz"
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    with open(path, "wb") as f:
        f.write(comp.compress(header(0x08, 1, 28, 28)))
        for _ in range(64):
            f.write(comp.compress(bytes(1 << 20)))
        f.write(comp.flush())
    assert path.stat().st_size < 1_000_000
    # What the reader takes out of the stream, counted (no wall-clock limit: the behaviour is
    # that it stops after the declared payload plus one byte, whatever the machine's speed).
    taken: list[tuple[int, int]] = []  # (bytes asked for, bytes handed out)
    read = gzip.GzipFile.read

    def counted(self, n=-1):
        out = read(self, n)
        taken.append((n, len(out)))
        return out

    monkeypatch.setattr(gzip.GzipFile, "read", counted)
    assert _peak_bytes_while_refused(path, "trailing bytes") < 5_000_000
    assert all(asked >= 0 for asked, _ in taken)  # never "read to the end"
    assert sum(got for _, got in taken) == 4 + 12 + 784 + 1  # header, one image, one more byte


def test_validate_pair_accepts_every_label_and_an_allowed_empty_split() -> None:
    images, labels = images_labels(10)  # labels 0..9: both ends of the range
    assert validate_pair(images, labels, "i", "l") is None
    assert validate_pair(images[:1], labels[-1:], "i", "l") is None  # one image, label 9
    empty = (np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    assert validate_pair(*empty, "i", "l", allow_empty=True) is None
    with pytest.raises(DatasetMismatchError, match="i: expected at least one image, found 0"):
        validate_pair(*empty, "i", "l")


@pytest.mark.parametrize(
    ("images", "labels", "match"),
    [
        (images_labels(10)[0], images_labels(9)[1],
         r"counts disagree: img.gz holds 10 images, lab.gz holds 9"),
        (images_labels(10)[0], np.where(np.arange(10) == 7, 10, np.arange(10)).astype(np.uint8),
         r"lab.gz: labels out of range: expected 0..9, found 10 at index 7"),
        (np.zeros((4, 28, 27), np.uint8), np.zeros(4, np.uint8), "img.gz: expected images of"),
        (np.zeros((4, 784), np.uint8), np.zeros(4, np.uint8), r"img.gz: expected images of shape"),
        (np.zeros((4, 28, 28), np.float32), np.zeros(4, np.uint8), r"N x 28 x 28 and dtype uint8"),
        (np.zeros((4, 28, 28), np.uint8), np.zeros(4, np.int32), "lab.gz: expected a 1-D uint8"),
    ],
    ids=["count", "label-range", "width", "flat", "float-images", "int32-labels"],
)  # fmt: skip
def test_validate_pair_refuses_a_mismatch_naming_the_file(images, labels, match) -> None:
    with pytest.raises(DatasetMismatchError, match=match):
        validate_pair(images, labels, "img.gz", "lab.gz")
