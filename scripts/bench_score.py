"""Benchmark `vae-pipeline score` on large `.npy` inputs: images per second and the peak resident
memory of the command, per input length (the memory must not grow with the length).

    .venv/bin/python scripts/bench_score.py --workdir . --sizes 20000,200000 [--k 100]

Each input is the workspace's test digits tiled to the length asked for, written straight into
a memory-mapped `.npy` (the benchmark itself never holds it). Each size runs the real command
in a child process; its peak resident set comes from the kernel (`wait4`), its rate from the
command's own `time_images_per_second` (the scoring parts) and from the wall time of the whole
command. Prints `name value` lines. Measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BIN = Path(sys.executable).parent


def tiled_input(path: Path, digits: np.ndarray, n: int) -> Path:
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 28, 28))
    for start in range(0, n, len(digits)):
        stop = min(n, start + len(digits))
        array[start:stop] = digits[: stop - start]
    array.flush()
    del array
    return path


def run_score(workdir: Path, npy: Path, out: Path, k: int) -> tuple[dict[str, str], float, int]:
    """The command's `name value` lines, its wall seconds and its peak RSS in bytes."""
    cmd = [str(BIN / "vae-pipeline"), "score", "--input", str(npy), "--out", str(out)]
    cmd += ["--workdir", str(workdir), "-S", f"evaluate.iwae_k={k}"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        log.seek(0)
        text = log.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"vae-pipeline score failed:\n{text[-3000:]}")
    lines = (line.split(" ", 1) for line in text.splitlines() if " " in line)
    return dict(pair for pair in lines if pair[0].isidentifier()), seconds, usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("."), help="a project with a champion")
    parser.add_argument("--sizes", default="20000,200000", help="input lengths, comma-separated")
    parser.add_argument("--k", type=int, default=100, help="importance samples per image")
    args = parser.parse_args()

    from vae_core.data import load_processed

    processed = args.workdir / "data" / "processed"
    (dataset,) = [p for p in processed.iterdir() if p.is_dir()]
    digits = load_processed(dataset).test_images.numpy()
    print(f"k {args.k}")
    with tempfile.TemporaryDirectory(prefix="bench-score-") as tmp:
        for n in (int(s) for s in args.sizes.split(",")):
            npy = tiled_input(Path(tmp) / f"digits-{n}.npy", digits, n)
            figures, seconds, peak = run_score(
                args.workdir, npy, Path(tmp) / f"{n}.parquet", args.k
            )
            print(f"images_{n} {n}")
            print(f"scoring_images_per_second_{n} {float(figures['time_images_per_second']):.0f}")
            print(f"command_images_per_second_{n} {n / seconds:.0f}")
            print(f"command_seconds_{n} {seconds:.1f}")
            print(f"peak_rss_mib_{n} {peak / 2**20:.0f}")
            print(f"input_mib_{n} {npy.stat().st_size / 2**20:.0f}")
            npy.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
