"""Read, validate and stream the images `vae-pipeline score --input PATH` scores.

PATH is one of three forms, told apart by what is on disk:

* a ``.npy`` file of shape (N, 28, 28), (N, 1, 28, 28) or (N, 784), dtype uint8 (grey levels
  0..255) or float (values in [0, 1]). It is memory-mapped, so a file of any length streams in
  bounded memory; pickled and object arrays are refused.
* a folder of IDX files (names containing ``idx`` or ``ubyte``, gzip allowed): each 3-D uint8
  (N, 28, 28) file is an image file, 1-D files (labels) are skipped.
* a folder of ``.png`` files, one 28x28 image each. Grey is expected; an RGB(A) image is turned
  grey by the mean of its three colour channels (alpha is ignored), so a colour export of a
  digit is scored as what it looks like rather than refused.

In a folder, other files (a README, a manifest) and hidden files (an interrupted atomic write's
temporary) are ignored; a folder holding both IDX and PNG files is refused as ambiguous.

`open_images` checks everything that is cheap to check (existence, form, shapes from headers,
dtype, at least one image), so most bad input fails before a model is even loaded; pixel values
(finite, in [0, 1]) and the payloads themselves are checked as each chunk is read. Every
refusal is a `ScoreInputError` naming the file, what was expected and what was found.
"""

from __future__ import annotations

import gzip
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from vae_core.data.errors import DataError, IdxFormatError
from vae_core.data.idx import IMAGE_SHAPE, MAX_IDX_BYTES, is_gzip, read_idx, read_idx_shape

Kind = Literal["npy", "idx", "png"]
PIXELS = math.prod(IMAGE_SHAPE)
NPY_SHAPES = "(N, 28, 28), (N, 1, 28, 28) or (N, 784)"
ACCEPTED = (
    "a .npy file, or a folder of IDX files (names containing 'idx' or 'ubyte') or of .png files"
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ScoreInputError(DataError):
    """The input to score is missing, of an unknown form, malformed or out of range."""


@dataclass(frozen=True)
class ImageChunk:
    """Up to ``chunk_size`` images as float32 (n, 28, 28) in [0, 1], with where each came from:
    its file's name (relative to the input folder) and its index within that file."""

    images: np.ndarray
    files: list[str]
    indices: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class _Part:
    """One input file: its path, the name reported for it, and how many images it holds."""

    path: Path
    name: str
    count: int


class ImageSource:
    """Opened, header-validated input; `chunks` reads the pixels. Made by `open_images`."""

    def __init__(self, path: Path, kind: Kind, parts: list[_Part], array: np.ndarray | None):
        self.path = path
        self.kind: Kind = kind
        self._parts = parts
        self._array = array  # the memory map of a .npy input

    def __len__(self) -> int:
        return sum(part.count for part in self._parts)

    def __repr__(self) -> str:
        return f"ImageSource({str(self.path)!r}, kind={self.kind!r}, images={len(self)})"

    def chunks(
        self, chunk_size: int, start: int = 0, stop: int | None = None
    ) -> Iterator[ImageChunk]:
        """The images at input positions start..stop-1 (default: all) in order, ``chunk_size``
        at a time (the last chunk may be smaller); a chunk may hold images from consecutive
        files. Each chunk's values are validated before it is yielded, so a bad value stops
        the stream at the chunk that holds it. Ranges let workers share one input."""
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
            raise ScoreInputError(f"chunk_size: expected a positive integer, found {chunk_size!r}")
        stop = len(self) if stop is None else min(stop, len(self))
        pending: list[tuple[np.ndarray, _Part, int]] = []
        count = 0
        for values, part, index in self._pieces(chunk_size, start, stop):
            offset = 0
            while offset < len(values):
                take = min(chunk_size - count, len(values) - offset)
                pending.append((values[offset : offset + take], part, index + offset))
                count += take
                offset += take
                if count == chunk_size:
                    yield _make_chunk(pending)
                    pending, count = [], 0
        if pending:
            yield _make_chunk(pending)

    def _pieces(
        self, chunk_size: int, first: int, stop: int
    ) -> Iterator[tuple[np.ndarray, _Part, int]]:
        """(raw values shaped (n, 28, 28), file, index of the first) for input positions
        first..stop-1 in order, never more than a chunk of a .npy or a PNG folder in memory,
        and one IDX file at a time."""
        if self.kind == "npy":
            assert self._array is not None
            part = self._parts[0]
            for start in range(first, stop, chunk_size):
                piece = _read_rows(self._array, part.path, start, min(start + chunk_size, stop))
                yield piece.reshape(len(piece), *IMAGE_SHAPE), part, start
            return
        offset = 0  # the input position of the part's first image
        for part in self._parts:
            lo, hi = max(first, offset) - offset, min(stop, offset + part.count) - offset
            offset += part.count
            if lo >= hi:
                continue
            values = _read_idx_images(part) if self.kind == "idx" else _decode_png(part.path)
            yield values[lo:hi], part, lo


def _make_chunk(pieces: list[tuple[np.ndarray, _Part, int]]) -> ImageChunk:
    images, files, indices = [], [], []
    for values, part, start in pieces:
        images.append(_to_unit(values, part.path, start))
        files.extend([part.name] * len(values))
        indices.append(np.arange(start, start + len(values), dtype=np.int64))
    joined = images[0] if len(images) == 1 else np.concatenate(images)
    return ImageChunk(np.asarray(joined), files, np.concatenate(indices))


def _to_unit(values: np.ndarray, path: Path, start: int) -> np.ndarray:
    """float32 in [0, 1]: uint8 divided by 255 (in range by construction); floats checked on
    their own dtype first, so a float64 1 + 1e-12 is refused rather than rounded to 1."""
    if values.dtype == np.uint8:
        images = values.astype(np.float32)
        images /= 255
        return images
    bad = ~(np.isfinite(values) & (values >= 0) & (values <= 1))
    if bad.any():
        flat = bad.reshape(len(values), -1)
        image = int(np.flatnonzero(flat.any(axis=1))[0])
        pixel = int(np.flatnonzero(flat[image])[0])
        value = float(values.reshape(len(values), -1)[image, pixel])
        raise ScoreInputError(
            f"{path}: image {start + image} holds {value:.6g} at pixel {divmod(pixel, 28)}: "
            f"expected finite values in [0, 1] ({int(bad.sum())} bad values in this chunk)"
        )
    return values.astype(np.float32)


def open_images(path: str | os.PathLike[str]) -> ImageSource:
    """Open PATH (a .npy file, a folder of IDX files or a folder of PNGs) and validate what
    headers and shapes tell, without reading pixel data; see the module docstring."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path)
    if not path.exists():
        raise ScoreInputError(f"{path}: expected {ACCEPTED}, found nothing (missing)")
    if path.is_file() and path.suffix.lower() == ".npy":
        return _open_npy(path)
    found = f"a {path.suffix} file" if path.suffix else "a file without a suffix"
    raise ScoreInputError(f"{path}: expected {ACCEPTED}, found {found}")


# --------------------------------------------------------------------------- .npy


def _open_npy(path: Path) -> ImageSource:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ScoreInputError(
            f"{path}: not a readable .npy file: expected a NumPy array of numbers, found "
            f"a truncated, corrupt, pickled or object array ({exc})"
        ) from exc
    if not isinstance(array, np.ndarray):
        array.close()
        raise ScoreInputError(f"{path}: expected a single-array .npy file, found a .npz archive")
    if array.dtype != np.uint8 and array.dtype.kind != "f":
        raise ScoreInputError(
            f"{path}: expected dtype uint8 (grey levels 0..255) or a float dtype (values in "
            f"[0, 1]), found {array.dtype}"
        )
    shape = tuple(array.shape)
    if shape[1:] not in ((*IMAGE_SHAPE,), (1, *IMAGE_SHAPE), (PIXELS,)):
        raise ScoreInputError(f"{path}: expected images of shape {NPY_SHAPES}, found {shape}")
    if shape[0] == 0:
        raise ScoreInputError(f"{path}: expected at least one image, found 0")
    return ImageSource(path, "npy", [_Part(path, path.name, shape[0])], array)


# --------------------------------------------------------------------------- folders


def _read_rows(array: np.ndarray, path: Path, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of a memory-mapped .npy, read from the file into a fresh array: the
    mapped pages of a slice stay in the process's resident set, so slicing the map would grow
    it with the input's length (150 MB for 200,000 images); reading a C-ordered file does not."""
    if not isinstance(array, np.memmap) or not array.flags.c_contiguous:
        return np.array(array[start:stop])
    row = math.prod(array.shape[1:])
    offset = array.offset + start * row * array.dtype.itemsize
    flat = np.fromfile(path, dtype=array.dtype, count=(stop - start) * row, offset=offset)
    return flat.reshape(stop - start, *array.shape[1:])


def _open_folder(folder: Path) -> ImageSource:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    idx = [p for p in files if "idx" in p.name.lower() or "ubyte" in p.name.lower()]
    png = [p for p in files if p.suffix.lower() == ".png"]
    if idx and png:
        raise ScoreInputError(
            f"{folder}: ambiguous input: expected IDX files or PNG files, found both "
            f"({len(idx)} IDX and {len(png)} PNG files)"
        )
    if not idx and not png:
        raise ScoreInputError(
            f"{folder}: expected IDX files (names containing 'idx' or 'ubyte') or .png files, "
            f"found no IDX or PNG image files ({len(files)} other files)"
        )
    parts = [_idx_part(p) for p in idx] if idx else [_png_part(p) for p in png]
    parts = [part for part in parts if part is not None]
    if not parts:
        raise ScoreInputError(
            f"{folder}: expected IDX image files of shape (N, 28, 28), found only 1-D files "
            f"(labels): {', '.join(p.name for p in idx)}"
        )
    source = ImageSource(folder, "idx" if idx else "png", parts, None)
    if len(source) == 0:
        raise ScoreInputError(f"{folder}: expected at least one image, found 0")
    return source


def _idx_part(path: Path) -> _Part | None:
    """The image file's part, None for a 1-D (label) file; the header decides, not the name."""
    try:
        shape = read_idx_shape(path)
        opener = gzip.open if is_gzip(path) else open
        with opener(path, "rb") as f:
            code = f.read(3)[2]
    except IdxFormatError as exc:
        raise ScoreInputError(str(exc)) from exc
    if len(shape) == 1:
        return None
    if len(shape) != 3:
        raise ScoreInputError(
            f"{path}: expected 3-D IDX images (N, 28, 28) or 1-D labels, found shape {shape}"
        )
    if shape[1:] != IMAGE_SHAPE:
        raise ScoreInputError(f"{path}: expected 28x28 images, found {shape[1]}x{shape[2]}")
    if code != 0x08:
        raise ScoreInputError(f"{path}: expected uint8 IDX images (code 0x08), found 0x{code:02X}")
    payload = shape[0] * PIXELS
    if payload > MAX_IDX_BYTES:
        raise ScoreInputError(
            f"{path}: expected at most {MAX_IDX_BYTES} bytes of images, header declares {payload}"
        )
    if not is_gzip(path) and (size := path.stat().st_size) != 16 + payload:
        raise ScoreInputError(
            f"{path}: truncated or padded IDX file: expected {16 + payload} bytes (header + "
            f"payload for shape {shape}), found {size}"
        )
    return _Part(path, path.name, shape[0])


def _read_idx_images(part: _Part) -> np.ndarray:
    try:
        images = read_idx(part.path)
    except IdxFormatError as exc:
        raise ScoreInputError(str(exc)) from exc
    if images.shape != (part.count, *IMAGE_SHAPE) or images.dtype != np.uint8:
        raise ScoreInputError(
            f"{part.path}: changed since it was opened: expected uint8 images of shape "
            f"{(part.count, *IMAGE_SHAPE)}, found {images.dtype} {images.shape}"
        )
    return images


def _png_part(path: Path) -> _Part:
    """Check the signature and the IHDR size (the first 24 bytes) without decoding."""
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:8] != PNG_SIGNATURE or head[12:16] != b"IHDR":
        raise ScoreInputError(
            f"{path}: expected a PNG file (signature and IHDR header), found {len(head)} "
            f"bytes starting 0x{head[:8].hex().upper()}"
        )
    width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if (height, width) != IMAGE_SHAPE:
        raise ScoreInputError(f"{path}: expected a 28x28 image, found {width}x{height}")
    return _Part(path, path.name, 1)


def _decode_png(path: Path) -> np.ndarray:
    """One image (1, 28, 28): uint8 grey as is, RGB(A) as float32 mean of R, G, B over 255."""
    import torch
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.UNCHANGED)
    except (RuntimeError, ValueError, OSError) as exc:
        reason = re.sub(r"^.*?\.cpp:\d+, ", "", str(exc).strip().splitlines()[-1])
        raise ScoreInputError(
            f"{path}: cannot decode: expected a complete PNG image, found {reason}"
        ) from exc
    channels, height, width = image.shape
    if (height, width) != IMAGE_SHAPE or image.dtype != torch.uint8 or channels > 4:
        raise ScoreInputError(
            f"{path}: expected an 8-bit 28x28 PNG, found {image.dtype} {width}x{height} "
            f"with {channels} channels"
        )
    pixels = image.numpy()
    if channels <= 2:  # grey, or grey + alpha
        return pixels[:1]
    return (pixels[:3].astype(np.float32).mean(axis=0, keepdims=True) / 255).astype(np.float32)
