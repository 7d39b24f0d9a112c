"""Score inputs: each form streams the right images in bounded chunks, and each kind of bad
input is refused (at open when headers tell, else at its chunk) naming the file and the detail."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_png

from vae_core.data.idx import encode_idx, write_idx
from vae_core.scoring.inputs import ImageSource, ScoreInputError, open_images


def digits(n: int, size: int = 28, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def npy(tmp: Path, array: np.ndarray, name: str = "in.npy", **kw) -> Path:
    np.save(tmp / name, array, **kw)
    return tmp / name


def folder(tmp: Path, files: dict[str, np.ndarray | bytes]) -> Path:
    """A folder of IDX files (arrays) and raw files (bytes), by name."""
    (tmp / "in").mkdir(exist_ok=True)
    for name, content in files.items():
        if isinstance(content, bytes):
            (tmp / "in" / name).write_bytes(content)
        else:
            write_idx(tmp / "in" / name, content)
    return tmp / "in"


def png(image: np.ndarray) -> bytes:
    return encode_png(torch.from_numpy(np.ascontiguousarray(image))).numpy().tobytes()


def read_all(source: ImageSource, chunk_size: int) -> tuple[np.ndarray, list, np.ndarray, list]:
    chunks = list(source.chunks(chunk_size))
    for chunk in chunks:
        assert chunk.images.dtype == np.float32 and chunk.images.shape[1:] == (28, 28)
        assert chunk.indices.dtype == np.int64 and len(chunk.files) == len(chunk) <= chunk_size
    images = np.concatenate([c.images for c in chunks])
    files = [f for c in chunks for f in c.files]
    return images, files, np.concatenate([c.indices for c in chunks]), [len(c) for c in chunks]


@pytest.mark.parametrize(
    ("dtype", "shape"), [(np.uint8, (7, 28, 28)), (np.float32, (7, 1, 28, 28)), ("f8", (7, 784))]
)
def test_npy_streams_images_in_chunks(tmp_path: Path, dtype, shape) -> None:
    expected = digits(7).astype(np.float32) / 255
    stored = digits(7) if dtype == np.uint8 else expected.astype(dtype)
    source = open_images(npy(tmp_path, stored.reshape(shape)))
    assert (source.kind, len(source), source.path) == ("npy", 7, tmp_path / "in.npy")
    images, files, indices, sizes = read_all(source, 3)
    np.testing.assert_allclose(images, expected, atol=1e-7)
    assert files == ["in.npy"] * 7 and indices.tolist() == list(range(7)) and sizes == [3, 3, 1]
    with pytest.raises(ScoreInputError, match="chunk_size: expected a positive integer, found 0"):
        next(source.chunks(0))


def test_idx_folder_skips_labels_and_other_files_and_spans_files(tmp_path: Path) -> None:
    a, b = digits(4, seed=1), digits(5, seed=2)
    files = {"b-idx3-ubyte.gz": b, "a-idx3-ubyte": a, "a-idx1-ubyte": a[:, 0, 0], "x.txt": b"x"}
    source = open_images(folder(tmp_path, files))
    assert (source.kind, len(source)) == ("idx", 9)
    images, names, indices, sizes = read_all(source, 3)
    np.testing.assert_array_equal(images, np.concatenate([a, b]).astype(np.float32) / 255)
    assert names == ["a-idx3-ubyte"] * 4 + ["b-idx3-ubyte.gz"] * 5
    assert indices.tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 4] and sizes == [3, 3, 3]


def test_png_folder_reads_grey_and_averages_colour(tmp_path: Path) -> None:
    grey, rgb = digits(3), digits(3, seed=5)
    files = {f"{i}.png": png(grey[i][None]) for i in range(3)}
    source = open_images(folder(tmp_path, {**files, "3.png": png(rgb), "readme.md": b"#"}))
    assert (source.kind, len(source)) == ("png", 4)
    images, names, indices, sizes = read_all(source, 2)
    np.testing.assert_allclose(images[:3], grey / 255, atol=1e-7)
    np.testing.assert_allclose(images[3], rgb.astype(np.float64).mean(axis=0) / 255, atol=1e-6)
    assert names == [f"{i}.png" for i in range(4)] and indices.tolist() == [0] * 4
    assert sizes == [2, 2]


def test_large_npy_is_memory_mapped_and_read_a_chunk_at_a_time(tmp_path: Path) -> None:
    path = npy(tmp_path, (np.arange(50_000 * 784) % 251).astype(np.uint8).reshape(-1, 28, 28))
    tracemalloc.start()
    try:
        source = open_images(path)
        count = sum(len(chunk) for chunk in source.chunks(1000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == len(source) == 50_000
    assert peak < 39_200_000 // 4  # the whole file is 39.2 MB; a float32 chunk is 3.1 MB


def raw(tmp: Path, name: str, data: bytes) -> Path:
    (tmp / name).write_bytes(data)
    return tmp / name


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def gz(array: np.ndarray) -> bytes:
    return gzip.compress(encode_idx(array), mtime=0)


NAN = np.full((6, 28, 28), 0.5, np.float32)
NAN[5, 3, 4] = np.nan
HIGH = np.full((3, 784), 0.25)
HIGH[2, 100] = 1.5
BUILD = {  # id -> the bad input, built under tmp_path
    "missing": lambda t: t / "nope.npy",
    "csv": lambda t: raw(t, "x.csv", b"1,2\n"),
    "npy-shape": lambda t: npy(t, digits(3, 32)),
    "npy-dtype": lambda t: npy(t, digits(2).astype(np.int64)),
    "npy-object": lambda t: npy(t, np.array([1, "a"], object), allow_pickle=True),
    "npy-truncated": lambda t: raw(t, "in.npy", half(npy(t, digits(9)).read_bytes())),
    "npy-empty": lambda t: npy(t, digits(0)),
    "npy-nan": lambda t: npy(t, NAN),
    "npy-high": lambda t: npy(t, HIGH),
    "idx-size": lambda t: folder(t, {"x-idx3-ubyte": digits(2, 32)}),
    "idx-magic": lambda t: folder(t, {"x.idx": b"PK\x03\x04zip"}),
    "idx-truncated": lambda t: folder(t, {"x-idx3-ubyte": half(encode_idx(digits(4)))}),
    "idx-gz-truncated": lambda t: folder(t, {"x-idx3-ubyte.gz": half(gz(digits(40)))}),
    "idx-labels-only": lambda t: folder(t, {"y-idx1-ubyte": np.zeros(3, np.uint8)}),
    "png-size": lambda t: folder(t, {"a.png": png(digits(1, 32))}),
    "png-signature": lambda t: folder(t, {"a.png": b"GIF89a" + bytes(40)}),
    "png-truncated": lambda t: folder(t, {"a.png": png(digits(1)), "b.png": half(png(digits(1)))}),
    "mixed": lambda t: folder(t, {"a.png": png(digits(1)), "x-idx3-ubyte": digits(1)}),
    "empty": lambda t: folder(t, {"a.txt": b"x"}),
}
EXPECT = {  # id -> fragments of the message, "|"-separated
    "missing": "nope.npy: expected a .npy file, or a folder of IDX|found nothing (missing)",
    "csv": "x.csv: expected a .npy file, or a folder of IDX files|found a .csv file",
    "npy-shape": "in.npy: expected images of shape (N, 28, 28)|or (N, 784), found (3, 32, 32)",
    "npy-dtype": "in.npy: expected dtype uint8|or a float dtype|found int64",
    "npy-object": "in.npy: not a readable .npy file|Python objects in dtype",
    "npy-truncated": "in.npy: not a readable .npy file: expected a NumPy array|truncated, corrupt",
    "npy-empty": "in.npy: expected at least one image, found 0",
    "npy-nan": "in.npy: image 5 holds nan at pixel (3, 4): expected finite values in [0, 1]",
    "npy-high": "in.npy: image 2 holds 1.5 at pixel (3, 16): expected finite values in [0, 1]",
    "idx-size": "x-idx3-ubyte: expected 28x28 images, found 32x32",
    "idx-magic": "x.idx: wrong magic number: expected an IDX header|found 0x50 0x4B",
    "idx-truncated": "x-idx3-ubyte: truncated or padded IDX file: expected 3152 bytes|found 1576",
    "idx-gz-truncated": "x-idx3-ubyte.gz: truncated or corrupt gzip data|expected 31360 bytes",
    "idx-labels-only": "in: expected IDX image files of shape (N, 28, 28)|1-D files (labels): y-",
    "png-size": "a.png: expected a 28x28 image, found 32x32",
    "png-signature": "a.png: expected a PNG file|starting 0x4749463839610000",
    "png-truncated": "b.png: cannot decode: expected a complete PNG image, found ",
    "mixed": "in: ambiguous input|found both (1 IDX and 1 PNG files)",
    "empty": "in: expected IDX files|found no IDX or PNG image files (1 other files)",
}
AT_READ = {"npy-nan", "npy-high", "idx-gz-truncated", "png-truncated"}  # headers are fine


@pytest.mark.parametrize("case", BUILD)
def test_bad_input_is_refused_naming_the_file_and_the_detail(tmp_path: Path, case: str) -> None:
    path = BUILD[case](tmp_path)
    if case in AT_READ:
        source = open_images(path)
        with pytest.raises(ScoreInputError) as info:
            list(source.chunks(4))
    else:
        with pytest.raises(ScoreInputError) as info:
            open_images(path)
    message = str(info.value)
    assert all(fragment in message for fragment in EXPECT[case].split("|")), message
