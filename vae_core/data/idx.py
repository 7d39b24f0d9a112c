"""Read and write IDX files (the MNIST format), gzip-compressed or raw, with strict validation.

An IDX file is a 4-byte magic number (two zero bytes, a dtype code, the number of dimensions),
one big-endian uint32 per dimension, then the values in row-major order, big-endian. Reading is
defensive: the header is checked and the declared size bounded before anything is allocated,
and decompression never inflates more than the header declares plus one byte, so a truncated,
padded or malicious file is refused with a message naming the file, what was expected and what
was found.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np

from vae_core.atomic import atomic_write_bytes
from vae_core.data.errors import DatasetMismatchError, IdxFormatError

GZIP_MAGIC = b"\x1f\x8b"

#: IDX dtype codes -> big-endian numpy dtypes (the format's published table).
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
IDX_DTYPE_NAMES: dict[int, str] = {
    0x08: "uint8",
    0x09: "int8",
    0x0B: "int16",
    0x0C: "int32",
    0x0D: "float32",
    0x0E: "float64",
}

#: Refuse any file whose header declares more payload than this (bytes), before allocating.
MAX_IDX_BYTES = 1_000_000_000
#: The format allows up to 255 dimensions; nothing real uses more than a handful.
MAX_IDX_NDIM = 16

IMAGE_SHAPE = (28, 28)
NUM_CLASSES = 10
_CHUNK = 1 << 20
# gzip.BadGzipFile is an OSError; EOFError means the stream stopped before its end marker.
_GZIP_ERRORS = (EOFError, zlib.error, OSError)


def _codes() -> str:
    return ", ".join(f"0x{c:02X} ({n})" for c, n in IDX_DTYPE_NAMES.items())


def is_gzip(path: str | os.PathLike[str]) -> bool:
    """Tell a gzip file by its first two bytes, since names (``.gz`` or not) can lie."""
    with open(path, "rb") as f:
        return f.read(2) == GZIP_MAGIC


def _read_exact(stream: BinaryIO, n: int, path: Path, what: str, compressed: bool) -> bytes:
    """Read exactly ``n`` bytes in bounded chunks; EOF and gzip errors become IdxFormatError."""
    parts: list[bytes] = []
    got = 0
    try:
        while got < n:
            chunk = stream.read(min(_CHUNK, n - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
    except _GZIP_ERRORS as exc:
        if not compressed:
            raise
        raise IdxFormatError(
            f"{path}: truncated or corrupt gzip data while reading the {what}: expected {n} "
            f"bytes, the compressed stream ended or broke before they were all read ({exc})"
        ) from exc
    if got < n:
        kind = "decompressed payload" if compressed else "file"
        raise IdxFormatError(
            f"{path}: truncated {what}: expected {n} bytes, found only {got} "
            f"(the {kind} ended early)"
        )
    return b"".join(parts)


@contextlib.contextmanager
def _open_idx(path: Path) -> Iterator[tuple[BinaryIO, bool]]:
    """The file's byte stream (decompressed when it is gzip, judged by content) and whether it
    was compressed; a missing path is refused with the file named."""
    if not path.is_file():
        raise IdxFormatError(f"{path}: expected an IDX file, found nothing (missing or not a file)")
    compressed = is_gzip(path)
    with open(path, "rb") as raw:
        if not compressed:
            yield raw, False
            return
        with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
            yield stream, True  # type: ignore[misc]


def read_idx(path: str | os.PathLike[str], *, max_bytes: int = MAX_IDX_BYTES) -> np.ndarray:
    """Read one IDX file (gzip detected by its magic bytes) into a native-endian numpy array.

    Refuses, with an ``IdxFormatError`` naming the file: a wrong magic number, an unknown dtype
    code, zero or too many dimensions, a header declaring more than ``max_bytes`` of payload
    (checked before allocating), a truncated gzip stream or payload, and trailing bytes (which
    also stops a gzip bomb after one extra byte).
    """
    path = Path(path)
    with _open_idx(path) as (stream, compressed):
        return _parse(stream, path, compressed, max_bytes)


def read_idx_shape(path: str | os.PathLike[str]) -> tuple[int, ...]:
    """The shape an IDX file's header declares, reading only the header (a few bytes).

    Raises ``IdxFormatError`` like ``read_idx`` for a missing file, a wrong magic number, an
    unknown dtype code or a bad number of dimensions; the payload is not read or checked.
    """
    path = Path(path)
    with _open_idx(path) as (stream, compressed):
        return _parse_header(stream, path, compressed)[1]


def _parse_header(stream: BinaryIO, path: Path, compressed: bool) -> tuple[int, tuple[int, ...]]:
    magic = _read_exact(stream, 4, path, "magic number", compressed)
    if magic[0] != 0 or magic[1] != 0:
        raise IdxFormatError(
            f"{path}: wrong magic number: expected an IDX header starting with bytes 0x00 0x00, "
            f"found 0x{magic[0]:02X} 0x{magic[1]:02X} (0x{magic.hex().upper()})"
        )
    code, ndim = magic[2], magic[3]
    if code not in IDX_DTYPES:
        raise IdxFormatError(
            f"{path}: unknown IDX dtype code 0x{code:02X}: expected one of {_codes()}"
        )
    if not 1 <= ndim <= MAX_IDX_NDIM:
        raise IdxFormatError(
            f"{path}: bad number of dimensions in the IDX header: expected 1 to {MAX_IDX_NDIM}, "
            f"found {ndim}"
        )
    header = _read_exact(stream, 4 * ndim, path, "dimension header", compressed)
    shape = tuple(int.from_bytes(header[4 * i : 4 * i + 4], "big") for i in range(ndim))
    return code, shape


def _parse(stream: BinaryIO, path: Path, compressed: bool, max_bytes: int) -> np.ndarray:
    code, shape = _parse_header(stream, path, compressed)
    ndim = len(shape)
    dtype = IDX_DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > max_bytes:
        raise IdxFormatError(
            f"{path}: absurd dimensions {shape} ({IDX_DTYPE_NAMES[code]}): the header declares "
            f"{nbytes} bytes of data, expected at most {max_bytes}; refusing to allocate"
        )
    payload = _read_exact(stream, nbytes, path, f"payload for shape {shape}", compressed)
    try:
        extra = stream.read(1)
    except _GZIP_ERRORS as exc:
        if not compressed:
            raise
        raise IdxFormatError(
            f"{path}: truncated or corrupt gzip stream after the {nbytes}-byte payload: "
            f"expected a complete gzip trailer ({exc})"
        ) from exc
    if extra:
        raise IdxFormatError(
            f"{path}: trailing bytes: expected exactly {4 + 4 * ndim + nbytes} bytes "
            f"(header + payload for shape {shape}), found more; refusing the file"
        )
    array = np.frombuffer(payload, dtype=dtype).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _code_for(dtype: np.dtype) -> int:
    for code, known in IDX_DTYPES.items():
        if known.kind == dtype.kind and known.itemsize == dtype.itemsize:
            return code
    raise IdxFormatError(f"cannot write dtype {dtype} as IDX: expected one of {_codes()}")


def encode_idx(array: np.ndarray) -> bytes:
    """Encode an array as IDX bytes (uncompressed), for writing or hashing."""
    array = np.asarray(array)
    if not 1 <= array.ndim <= MAX_IDX_NDIM:
        raise IdxFormatError(
            f"cannot write a {array.ndim}-dimensional array as IDX: expected 1 to {MAX_IDX_NDIM}"
        )
    if any(d >= 2**32 for d in array.shape):
        raise IdxFormatError(f"cannot write shape {array.shape} as IDX: dimensions exceed 2**32-1")
    code = _code_for(array.dtype)
    header = bytes([0, 0, code, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()


def write_idx(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Write an array as IDX, gzip-compressed when the name ends in ``.gz``, atomically.

    The gzip output is deterministic (mtime 0, fixed name) so identical arrays give identical
    bytes and therefore identical DVC hashes.
    """
    path = Path(path)
    data = encode_idx(array)
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(
            filename=path.name[:-3], mode="wb", fileobj=buf, compresslevel=6, mtime=0
        ) as gz:
            gz.write(data)
        data = buf.getvalue()
    atomic_write_bytes(path, data)


def validate_pair(
    images: np.ndarray,
    labels: np.ndarray,
    images_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    allow_empty: bool = False,
) -> None:
    """Check that an image file and its label file form an MNIST-style split.

    Images must be ``N x 28 x 28`` uint8, labels ``N`` uint8 in 0..9, with the same ``N``
    (at least one, unless ``allow_empty``: a split that may be switched off); anything else
    raises ``DatasetMismatchError`` naming the file and both values.
    """
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise DatasetMismatchError(
            f"{images_path}: expected images of shape N x 28 x 28 and dtype uint8, "
            f"found shape {tuple(images.shape)} and dtype {images.dtype}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DatasetMismatchError(
            f"{labels_path}: expected a 1-D uint8 label vector, found shape "
            f"{tuple(labels.shape)} and dtype {labels.dtype}"
        )
    if images.shape[0] == 0 and not allow_empty:
        raise DatasetMismatchError(f"{images_path}: expected at least one image, found 0")
    if images.shape[0] != labels.shape[0]:
        raise DatasetMismatchError(
            f"image and label counts disagree: {images_path} holds {images.shape[0]} images, "
            f"{labels_path} holds {labels.shape[0]} labels; expected the same number"
        )
    bad = np.flatnonzero(labels >= NUM_CLASSES)
    if bad.size:
        raise DatasetMismatchError(
            f"{labels_path}: labels out of range: expected 0..{NUM_CLASSES - 1}, found "
            f"{int(labels[bad[0]])} at index {int(bad[0])} ({bad.size} bad labels in all)"
        )
