"""Corrupt and hostile data through the fetch and prepare stages' entry points (what `dvc
repro` runs): each is refused with one clear `error:` line (exit status 2, no traceback) and
leaves no partial output: a destination that held good data still holds it byte for byte, a
destination that did not exist still does not, and no staging folder is left behind.

These go beyond the unit tests of tests/vae_core/test_idx.py and the stage tests of
tests/flows/test_dvc_stages.py: the same hostile files meet the whole stage, and new ones
(symlink loops, FIFOs, /dev/zero, folders in place of files, multi-member gzip, float or
32x32 images, label files as images, tampered raw files) are added.
"""

from __future__ import annotations

import gzip
import os
import shutil
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from flows import stages
from flows.params import write_params
from vae_core.data import sources as src
from vae_core.data.idx import encode_idx, write_idx
from vae_core.data.sources import RAW_FILES

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES = RAW_FILES["train_images"]
LABELS = RAW_FILES["train_labels"]
N_TRAIN, N_TEST = 300, 60


def write_good(folder: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(N_TRAIN) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(N_TEST) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in RAW_FILES.items():
        write_idx(folder / name, arrays[key])


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


# --------------------------------------------------------------------------- the hostile files
# Each takes the source folder (holding four good files) and the test's tmp_path, breaks it,
# and returns a short description of what it did.


def wrong_dtype_code(folder: Path, tmp: Path) -> str:
    data = bytearray(gzip.decompress((folder / IMAGES).read_bytes()))
    data[2] = 0x0A  # not in the IDX table (0x08, 0x09, 0x0B-0x0E)
    (folder / IMAGES).write_bytes(gz(bytes(data)))
    return "IDX dtype byte of the training images set to 0x0A"


def float_images(folder: Path, tmp: Path) -> str:
    images = np.random.default_rng(1).random((N_TRAIN, 28, 28), dtype=np.float32)
    write_idx(folder / IMAGES, images)
    return "training images written as float32 IDX (code 0x0D), a valid IDX file"


def absurd_dimensions(folder: Path, tmp: Path) -> str:
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (60000, 50000, 50000))
    (folder / IMAGES).write_bytes(gz(header + b"\x00" * 1000))
    return "header declares 60000 x 50000 x 50000 uint8 (150 TB), 1 KB of payload"


def huge_label_count(folder: Path, tmp: Path) -> str:
    header = bytes([0, 0, 0x08, 1]) + (0xFFFFFFFF).to_bytes(4, "big")
    (folder / LABELS).write_bytes(gz(header + bytes(N_TRAIN)))
    return "label header declares 0xFFFFFFFF labels (-1 as int32)"


def gzip_bomb(folder: Path, tmp: Path) -> str:
    """A valid header and payload followed by 256 MB of zeros compressed to a few hundred KB."""
    good = gzip.decompress((folder / IMAGES).read_bytes())
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
    parts = [comp.compress(good)]
    zeros = bytes(1 << 20)
    for _ in range(256):
        parts.append(comp.compress(zeros))
    parts.append(comp.flush())
    bomb = b"".join(parts)
    (folder / IMAGES).write_bytes(bomb)
    return f"images .gz of {len(bomb) // 1024} KB inflating to 256 MB (valid header + payload)"


def symlink_outside(folder: Path, tmp: Path) -> str:
    outside = tmp / "elsewhere"
    outside.mkdir()
    shutil.move(folder / IMAGES, outside / IMAGES)
    (folder / IMAGES).symlink_to(outside / IMAGES)
    return "training images are a symlink to a file outside the source folder"


def symlink_dev_zero(folder: Path, tmp: Path) -> str:
    (folder / IMAGES).unlink()
    (folder / IMAGES).symlink_to("/dev/zero")
    return "training images are a symlink to /dev/zero (endless zeros)"


def symlink_loop(folder: Path, tmp: Path) -> str:
    (folder / IMAGES).unlink()
    (folder / IMAGES).symlink_to(IMAGES)
    return "training images are a symlink to itself (a loop)"


def fifo(folder: Path, tmp: Path) -> str:
    (folder / IMAGES).unlink()
    os.mkfifo(folder / IMAGES)
    return "training images are a named pipe nobody writes to (a read would block forever)"


def directory_as_file(folder: Path, tmp: Path) -> str:
    (folder / IMAGES).unlink()
    (folder / IMAGES).mkdir()
    (folder / IMAGES / "x").write_bytes(b"x")
    return "a folder where the training images file is expected"


def zero_dimensions(folder: Path, tmp: Path) -> str:
    (folder / IMAGES).write_bytes(gz(bytes([0, 0, 0x08, 0])))
    return "IDX header with ndim 0"


def labels_as_images(folder: Path, tmp: Path) -> str:
    shutil.copyfile(folder / LABELS, folder / IMAGES)
    return "the training labels file copied over the training images file"


def images_32x32(folder: Path, tmp: Path) -> str:
    write_idx(folder / IMAGES, np.zeros((N_TRAIN, 32, 32), np.uint8))
    return "training images of 32 x 32 pixels"


def truncated_header(folder: Path, tmp: Path) -> str:
    (folder / IMAGES).write_bytes(gz(bytes([0, 0, 0x08, 3, 0, 0])))
    return "a 6-byte file: magic number and 2 of the 12 dimension bytes"


def multi_member_gzip(folder: Path, tmp: Path) -> str:
    path = folder / IMAGES
    path.write_bytes(path.read_bytes() + gz(b"\x00" * 4096))
    return "a second gzip member (4 KB) appended after the valid images"


def garbage_named_gz(folder: Path, tmp: Path) -> str:
    (folder / IMAGES).write_bytes(np.random.default_rng(3).bytes(50_000))
    return "50 KB of random bytes named train-images-idx3-ubyte.gz"


FOLDER_CASES: dict[str, tuple[Callable[[Path, Path], str], list[str]]] = {
    "wrong IDX dtype code": (wrong_dtype_code, [IMAGES, "unknown IDX dtype code 0x0A"]),
    "float32 images": (float_images, [IMAGES, "dtype uint8", "float32"]),
    "absurd dimensions": (absurd_dimensions, [IMAGES, "absurd dimensions", "refusing to allocate"]),
    "huge label count": (huge_label_count, [LABELS, "absurd dimensions", "4294967295"]),
    "gzip bomb": (gzip_bomb, [IMAGES, "trailing bytes"]),
    "symlink outside folder": (symlink_outside, [IMAGES, "resolves outside the source folder"]),
    "symlink to /dev/zero": (symlink_dev_zero, [IMAGES, "/dev/zero", "outside the source"]),
    "symlink loop": (symlink_loop, [IMAGES, "expected a regular file"]),
    "named pipe (FIFO)": (fifo, [IMAGES, "expected a regular file"]),
    "directory as file": (directory_as_file, [IMAGES, "expected a regular file"]),
    "IDX with ndim 0": (zero_dimensions, [IMAGES, "number of dimensions", "found 0"]),
    "labels file as images": (labels_as_images, [IMAGES, "N x 28 x 28", "shape (300,)"]),
    "images 32x32": (images_32x32, [IMAGES, "N x 28 x 28", "(300, 32, 32)"]),
    "truncated header": (truncated_header, [IMAGES, "truncated dimension header"]),
    "multi-member gzip": (multi_member_gzip, [IMAGES, "trailing bytes"]),
    "random bytes named .gz": (garbage_named_gz, [IMAGES, "wrong magic number"]),
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def stage_root(tmp_path: Path) -> Path:
    """params.yaml, a good source folder, and good raw + processed outputs made from it."""
    shutil.copy2(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    # the sources hold 300 images
    write_params(tmp_path / "params.yaml", ["data.val_size=50", "data.holdout_size=50"])
    write_good(tmp_path / "good")
    rc, err = run_stage(
        tmp_path, "fetch", tmp_path / "out" / "raw", f"data.source={tmp_path / 'good'}"
    )
    assert rc == 0, err
    rc, err = run_stage(tmp_path, "prepare", tmp_path / "out" / "processed")
    assert rc == 0, err
    return tmp_path


def run_stage(root: Path, stage: str, out: Path, *overrides: str) -> tuple[int, str]:
    """``python -m flows.stages STAGE`` in-process; returns (exit status, stderr)."""
    import contextlib
    import io

    args = [stage, "--params", str(root / "params.yaml"), "--out", str(out)]
    if stage == "prepare":
        args += ["--raw", str(root / "out" / "raw")]
    for o in overrides:
        args += ["-S", o]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = stages.main(args)
        except BaseException as exc:  # a crash, not a refusal: report it as the tests see it
            import traceback

            err.write("Traceback (uncaught)\n" + "".join(traceback.format_exception(exc)))
            rc = -1
    return rc, err.getvalue()


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep) if parent.exists() else []


# --------------------------------------------------------------------------- tests


def test_at_least_ten_hostile_cases() -> None:
    assert len(FOLDER_CASES) + len(CSV_CASES) + 1 >= 10


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_hostile_source_folder_refused_nothing_written(
    stage_root: Path, helpers, record, case: str
) -> None:
    breaker, fragments = FOLDER_CASES[case]
    bad = stage_root / "bad"
    write_good(bad, seed=7)
    what = breaker(bad, stage_root)
    raw = stage_root / "out" / "raw"
    before = helpers.tree_digest(stage_root / "out")
    fresh = stage_root / "fresh" / "raw"

    t0 = time.monotonic()
    rc, err = run_stage(stage_root, "fetch", raw, f"data.source={bad}")
    seconds = time.monotonic() - t0
    rc_fresh, err_fresh = run_stage(stage_root, "fetch", fresh, f"data.source={bad}")

    after = helpers.tree_digest(stage_root / "out")
    litter = leftovers(raw.parent, {"raw", "processed"}) + leftovers(fresh.parent, set())
    record(
        f"hostile data: {case}",
        f"{what}; fetch stage",
        f"exit {rc} in {seconds:.2f} s; old data {'kept' if after == before else 'CHANGED'}; "
        f"fresh dest {'not created' if not fresh.exists() else 'CREATED'}; leftovers "
        f"{litter or 'none'}: {helpers.short(err, 90)!r}",
    )
    assert rc == 2 and rc_fresh == 2, err + err_fresh
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert after == before, "the previous raw/processed data changed"
    assert not fresh.exists(), "a refused fetch created its destination"
    assert litter == [], f"staging leftovers: {litter}"
    assert seconds < 30, f"took {seconds:.1f} s: the file was processed, not refused early"


# --------------------------------------------------------------------------- embedded CSV

WIDTH = 28 * 28 + 1


def csv_rows(n: int = 30) -> list[list[str]]:
    rows = []
    for i in range(n):
        row = ["0"] * (WIDTH - 1) + [str(i % 10)]
        rows.append(row)
    return rows


def csv_text(rows: list[list[str]]) -> bytes:
    return ("\n".join(",".join(r) for r in rows) + "\n").encode()


def csv_non_numeric() -> tuple[bytes, str]:
    rows = csv_rows()
    rows[2][4] = "abc"
    return csv_text(rows), "a non-numeric cell 'abc' at row 3, column 5"


def csv_nan_pixel() -> tuple[bytes, str]:
    rows = csv_rows()
    rows[5][10] = "nan"
    return csv_text(rows), "a 'nan' pixel at row 6"


def csv_out_of_range() -> tuple[bytes, str]:
    rows = csv_rows()
    rows[7][100] = "300"
    return csv_text(rows), "a pixel value 300 at row 8"


def csv_short_row() -> tuple[bytes, str]:
    rows = csv_rows()
    rows[3] = rows[3][:400]
    return csv_text(rows), "row 4 cut to 400 of 785 values"


def csv_binary() -> tuple[bytes, str]:
    return b"\x00\x01\x02 binary \xff\xfe junk", "binary junk (invalid UTF-8) instead of text"


CSV_CASES = {
    "embedded CSV: non-numeric": (
        csv_non_numeric,
        ["row 3, column 5", "expected a number", "'abc'"],
    ),
    "embedded CSV: NaN pixel": (csv_nan_pixel, ["row 6", "NaN or infinity"]),
    "embedded CSV: pixel 300": (csv_out_of_range, ["row 8", "expected pixel values 0..255"]),
    "embedded CSV: short row": (csv_short_row, ["row 4", "expected 785", "found 400"]),
    "embedded CSV: binary junk": (csv_binary, ["cannot read the embedded CSV", "utf-8"]),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_hostile_embedded_csv_refused(
    stage_root: Path, helpers, record, monkeypatch, case: str
) -> None:
    maker, fragments = CSV_CASES[case]
    text, what = maker()
    csv = stage_root / "mnist_5k.csv.gz"
    csv.write_bytes(gzip.compress(text, mtime=0))
    monkeypatch.setattr(src, "embedded_csv_path", lambda: csv)
    raw = stage_root / "out" / "raw"
    before = helpers.tree_digest(stage_root / "out")
    rc, err = run_stage(stage_root, "fetch", raw, "data.source=embedded")
    after = helpers.tree_digest(stage_root / "out")
    litter = leftovers(raw.parent, {"raw", "processed"})
    record(
        f"hostile data: {case}",
        f"embedded CSV with {what}; fetch stage",
        f"exit {rc}; old data {'kept' if after == before else 'CHANGED'}; leftovers "
        f"{litter or 'none'}: {helpers.short(err, 90)!r}",
    )
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert after == before and litter == []


def test_raw_file_tampered_after_fetch_is_refused_by_prepare(
    stage_root: Path, helpers, record
) -> None:
    raw = stage_root / "out" / "raw"
    processed = stage_root / "out" / "processed"
    images = np.zeros((N_TRAIN, 28, 28), np.uint8)  # a valid file, but not the fetched one
    (raw / IMAGES).write_bytes(gz(encode_idx(images)))
    before = helpers.tree_digest(processed)
    rc, err = run_stage(stage_root, "prepare", processed)
    after = helpers.tree_digest(processed)
    record(
        "hostile data: raw file swapped",
        "a valid IDX file swapped in under data/raw after the fetch; prepare stage",
        f"exit {rc}; processed data {'kept' if after == before else 'CHANGED'}: "
        f"{helpers.short(err, 90)!r}",
    )
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert "sha256 checksum mismatch" in err and IMAGES in err
    assert after == before
