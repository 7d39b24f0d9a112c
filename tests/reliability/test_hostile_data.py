"""Corrupt and hostile data through the fetch and prepare stages' entry points (what `dvc
repro` runs): each is refused with one `error:` line (exit status 2, no traceback) and leaves no
partial output: good data stays byte for byte, no destination or staging folder is created.
Beyond test_idx.py and test_dvc_stages.py: hostile files (symlinks, FIFOs, /dev/zero, gzip
bombs, ...) meet the whole stage."""

import gzip
import os
import shutil
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, run_stage, tree_digest, write_idx_folder

from flows.params import write_params
from vae_core.data import sources as src
from vae_core.data.idx import encode_idx, write_idx
from vae_core.data.sources import RAW_FILES

IMAGES = RAW_FILES["train_images"]
LABELS = RAW_FILES["train_labels"]
N_TRAIN, N_TEST = 300, 60
#: The most memory (Python and numpy allocations) a refused fetch may take: the good files are
#: 0.3 MB, the hostile ones inflate to 256 MB or more, so a stage that reads them before
#: refusing shows up here (by what it allocates, not by how long it takes).
PEAK_LIMIT_MB = 32


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


#: case: fragments the one `error:` line must contain.
FOLDER_CASES = {
    "wrong IDX dtype code": [IMAGES, "unknown IDX dtype code 0x0A"],
    "float32 images": [IMAGES, "dtype uint8", "float32"],
    "absurd dimensions": [IMAGES, "absurd dimensions", "refusing to allocate"],
    "huge label count": [LABELS, "absurd dimensions", "4294967295"],
    "gzip bomb": [IMAGES, "trailing bytes"],
    "symlink outside folder": [IMAGES, "resolves outside the source folder"],
    "symlink to /dev/zero": [IMAGES, "/dev/zero", "outside the source"],
    "symlink loop": [IMAGES, "expected a regular file"],
    "named pipe (FIFO)": [IMAGES, "expected a regular file"],
    "directory as file": [IMAGES, "expected a regular file"],
    "IDX with ndim 0": [IMAGES, "number of dimensions", "found 0"],
    "labels file as images": [IMAGES, "N x 28 x 28", "shape (300,)"],
    "images 32x32": [IMAGES, "N x 28 x 28", "(300, 32, 32)"],
    "truncated header": [IMAGES, "truncated dimension header"],
    "multi-member gzip": [IMAGES, "trailing bytes"],
    "random bytes named .gz": [IMAGES, "wrong magic number"],
}


def break_folder(case: str, folder: Path, tmp: Path) -> str:
    """Break the source ``folder`` (four good files) as ``case`` says; returns what was done."""
    images, labels = folder / IMAGES, folder / LABELS
    match case:
        case "wrong IDX dtype code":
            data = bytearray(gzip.decompress(images.read_bytes()))
            data[2] = 0x0A  # not in the IDX table (0x08, 0x09, 0x0B-0x0E)
            images.write_bytes(gz(bytes(data)))
            return "IDX dtype byte of the training images set to 0x0A"
        case "float32 images":
            write_idx(images, np.random.default_rng(1).random((N_TRAIN, 28, 28), np.float32))
            return "training images written as float32 IDX (code 0x0D), a valid IDX file"
        case "absurd dimensions":
            dims = b"".join(d.to_bytes(4, "big") for d in (60000, 50000, 50000))
            images.write_bytes(gz(bytes([0, 0, 0x08, 3]) + dims + b"\x00" * 1000))
            return "header declares 60000 x 50000 x 50000 uint8 (150 TB), 1 KB of payload"
        case "huge label count":
            labels.write_bytes(gz(bytes([0, 0, 0x08, 1]) + b"\xff" * 4 + bytes(N_TRAIN)))
            return "label header declares 0xFFFFFFFF labels (-1 as int32)"
        case "gzip bomb":
            comp = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip container
            parts = [comp.compress(gzip.decompress(images.read_bytes()))]
            parts += [comp.compress(bytes(1 << 20)) for _ in range(256)] + [comp.flush()]
            size = images.write_bytes(b"".join(parts)) // 1024
            return f"images .gz of {size} KB inflating to 256 MB (valid header + payload)"
        case "symlink outside folder":
            (tmp / "elsewhere").mkdir()
            shutil.move(images, tmp / "elsewhere" / IMAGES)
            images.symlink_to(tmp / "elsewhere" / IMAGES)
            return "training images are a symlink to a file outside the source folder"
        case "symlink to /dev/zero":
            images.unlink()
            images.symlink_to("/dev/zero")
            return "training images are a symlink to /dev/zero (endless zeros)"
        case "symlink loop":
            images.unlink()
            images.symlink_to(IMAGES)
            return "training images are a symlink to itself (a loop)"
        case "named pipe (FIFO)":
            images.unlink()
            os.mkfifo(images)
            return "training images are a named pipe nobody writes to (a read would block)"
        case "directory as file":
            images.unlink()
            images.mkdir()
            (images / "x").write_bytes(b"x")
            return "a folder where the training images file is expected"
        case "IDX with ndim 0":
            images.write_bytes(gz(bytes([0, 0, 0x08, 0])))
            return "IDX header with ndim 0"
        case "labels file as images":
            shutil.copyfile(labels, images)
            return "the training labels file copied over the training images file"
        case "images 32x32":
            write_idx(images, np.zeros((N_TRAIN, 32, 32), np.uint8))
            return "training images of 32 x 32 pixels"
        case "truncated header":
            images.write_bytes(gz(bytes([0, 0, 0x08, 3, 0, 0])))
            return "a 6-byte file: magic number and 2 of the 12 dimension bytes"
        case "multi-member gzip":
            images.write_bytes(images.read_bytes() + gz(b"\x00" * 4096))
            return "a second gzip member (4 KB) appended after the valid images"
        case "random bytes named .gz":
            images.write_bytes(np.random.default_rng(3).bytes(50_000))
            return "50 KB of random bytes named train-images-idx3-ubyte.gz"
    raise AssertionError(case)


@pytest.fixture
def stage_root(tmp_path: Path) -> Path:
    """params.yaml, a good source folder, and good raw + processed outputs made from it."""
    shutil.copy2(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    write_params(tmp_path / "params.yaml", ["data.val_size=50", "data.holdout_size=50"])  # of 300
    write_idx_folder(tmp_path / "good", N_TRAIN, N_TEST)
    out = tmp_path / "out"
    rc, err = run_stage(tmp_path, "fetch", out / "raw", f"data.source={tmp_path / 'good'}")
    assert rc == 0, err
    rc, err = run_stage(tmp_path, "prepare", out / "processed", raw=out / "raw")
    assert rc == 0, err
    return tmp_path


def fetch_measured(root: Path, out: Path, source: Path) -> tuple[int, str, float]:
    """The fetch stage from ``source`` into ``out``: (exit status, stderr, peak MB allocated)."""
    tracemalloc.start()
    try:
        rc, err = run_stage(root, "fetch", out, f"data.source={source}")
        peak = tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()
    return rc, err, peak


def leftovers(parent: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name not in keep) if parent.exists() else []


@pytest.mark.timeout(120)  # a hang guard (a FIFO read blocks forever), not a speed limit
@pytest.mark.parametrize("case", list(FOLDER_CASES))
def test_hostile_source_folder_refused_nothing_written(stage_root: Path, record, case: str) -> None:
    bad = stage_root / "bad"
    write_idx_folder(bad, N_TRAIN, N_TEST, seed=7)
    what = break_folder(case, bad, stage_root)
    raw, fresh = stage_root / "out" / "raw", stage_root / "fresh" / "raw"
    before = tree_digest(stage_root / "out")
    rc, err, peak = fetch_measured(stage_root, raw, bad)
    rc_fresh, err_fresh, peak_fresh = fetch_measured(stage_root, fresh, bad)
    after = tree_digest(stage_root / "out")
    litter = leftovers(raw.parent, {"raw", "processed"}) + leftovers(fresh.parent, set())
    record(
        f"hostile data: {case}",
        f"{what}; fetch stage",
        f"exit {rc}, peak {max(peak, peak_fresh):.1f} MB; old data kept: {after == before}; fresh "
        f"dest created: {fresh.exists()}; leftovers {litter or 'none'}: {record.short(err, 90)!r}",
    )
    assert rc == 2 and rc_fresh == 2, err + err_fresh
    assert "Traceback" not in err, err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    for fragment in FOLDER_CASES[case]:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert after == before, "the previous raw/processed data changed"
    assert not fresh.exists(), "a refused fetch created its destination"
    assert litter == [], f"staging leftovers: {litter}"
    assert max(peak, peak_fresh) < PEAK_LIMIT_MB, "the file was read in, not refused early"


def csv_with(row: int, cells: slice | int, value: list[str] | str) -> bytes:
    """30 good rows (784 zero pixels and a label) with ``rows[row][cells] = value``."""
    rows = [["0"] * 784 + [str(i % 10)] for i in range(30)]
    rows[row][cells] = value
    return ("\n".join(",".join(r) for r in rows) + "\n").encode()


#: what the CSV holds: (CSV bytes, fragments of the error)
CSV_CASES = {
    "non-numeric 'abc' at row 3": (
        csv_with(2, 4, "abc"),
        ["row 3, column 5", "expected a number", "'abc'"],
    ),
    "'nan' pixel at row 6": (csv_with(5, 10, "nan"), ["row 6", "NaN or infinity"]),
    "pixel 300 at row 8": (csv_with(7, 100, "300"), ["row 8", "expected pixel values 0..255"]),
    "row 4 cut to 400 of 785 values": (
        csv_with(3, slice(400, None), []),
        ["row 4", "expected 785", "found 400"],
    ),
    "binary junk (not UTF-8)": (
        b"\x00\x01\x02 binary \xff\xfe junk",
        ["cannot read the embedded CSV", "utf-8"],
    ),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_hostile_embedded_csv_refused(stage_root: Path, record, monkeypatch, case: str) -> None:
    text, fragments = CSV_CASES[case]
    csv = stage_root / "mnist_5k.csv.gz"
    csv.write_bytes(gzip.compress(text, mtime=0))
    monkeypatch.setattr(src, "embedded_csv_path", lambda: csv)
    raw = stage_root / "out" / "raw"
    before = tree_digest(stage_root / "out")
    rc, err = run_stage(stage_root, "fetch", raw, "data.source=embedded")
    after = tree_digest(stage_root / "out")
    litter = leftovers(raw.parent, {"raw", "processed"})
    record(
        "hostile data: embedded CSV",
        f"embedded CSV with {case}; fetch stage",
        f"exit {rc}; old data kept: {after == before}; leftovers {litter or 'none'}: "
        f"{record.short(err, 90)!r}",
    )
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert after == before and litter == []


def test_raw_file_tampered_after_fetch_is_refused_by_prepare(stage_root: Path, record) -> None:
    raw, processed = stage_root / "out" / "raw", stage_root / "out" / "processed"
    # A valid file, but not the fetched one.
    (raw / IMAGES).write_bytes(gz(encode_idx(np.zeros((N_TRAIN, 28, 28), np.uint8))))
    before = tree_digest(processed)
    rc, err = run_stage(stage_root, "prepare", processed, raw=raw)
    after = tree_digest(processed)
    record(
        "hostile data: raw file swapped",
        "a valid IDX file swapped in under data/raw after the fetch; prepare stage",
        f"exit {rc}; processed data {'kept' if after == before else 'CHANGED'}: "
        f"{record.short(err, 90)!r}",
    )
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err, err
    assert "sha256 checksum mismatch" in err and IMAGES in err
    assert after == before
