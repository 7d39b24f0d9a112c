"""SIGKILL during training: `vae-pipeline train --out DIR` killed at several epochs and
started again each time resumes from DIR/checkpoints/last.pt and ends with weights identical,
tensor for tensor, to those of an uninterrupted run with the same seed (CPU).

One output folder goes through the whole chain: killed after a random epoch, resumed and
killed after a later random epoch, then resumed to the end (the epochs and the moment of each
kill are drawn from a seeded generator: RELIABILITY_KILL_SEED). Each kill lands a random
fraction of an epoch's duration (as the checkpoint reports it) after the checkpoint appears, so
it hits the middle of the next epoch, or the checkpoint write itself, on a fast machine or a
slow one alike. Two uninterrupted runs go alongside: the reference, and a second one
that tells a resume problem apart from a run that is not reproducible in the first place.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vae_core.data.idx import write_idx
from vae_core.data.sources import RAW_FILES

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 4
KILLS = 2
SEED = int(os.environ.get("RELIABILITY_KILL_SEED", "20261127"))


def write_source(folder: Path) -> None:
    rng = np.random.default_rng(0)
    base = rng.random((10, 28, 28)) < 0.15  # ten "digit" templates, then noisy copies
    n_train, n_test = 800, 200
    labels = np.arange(n_train + n_test) % 10
    flips = rng.random((n_train + n_test, 28, 28)) < 0.05
    images = ((base[labels] ^ flips) * 255).astype(np.uint8)
    folder.mkdir(parents=True)
    arrays = {
        "train_images": images[:n_train],
        "train_labels": labels[:n_train].astype(np.uint8),
        "test_images": images[n_train:],
        "test_labels": labels[n_train:].astype(np.uint8),
    }
    for key, name in RAW_FILES.items():
        write_idx(folder / name, arrays[key])


def command(source: Path, out: Path) -> list[str]:
    settings = {
        "data.source": source,
        "data.val_size": 100,
        "train.epochs": EPOCHS,
        "train.device": "cpu",
        "train.seed": 0,
        "model.hidden_sizes": "[64]",
        "model.latent_dim": 4,
        "train.batch_size": 16,
        "train.patience": 0,
    }
    overrides = [arg for key, value in settings.items() for arg in ("-S", f"{key}={value}")]
    return [sys.executable, "-m", "flows.cli", "train", *overrides, "--out", str(out)]


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("PYTHONPATH", None)
    # The same thread count in every run: CPU kernels are then bit-for-bit repeatable.
    e.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    return e


def checkpoint_epoch(out: Path) -> int | None:
    path = out / "checkpoints" / "last.pt"
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except (FileNotFoundError, EOFError, RuntimeError, KeyError, OSError):
        return None


def start(source: Path, out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        command(source, out),
        cwd=REPO_ROOT,
        env=env(),
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )


def checkpoint_progress(out: Path) -> tuple[int, float] | None:
    """(epochs done, seconds the last one took) from last.pt, or None before the first."""
    try:
        state = torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=True)
        return int(state["epoch"]), float(state["history"][-1]["epoch_seconds"])
    except (FileNotFoundError, EOFError, RuntimeError, KeyError, IndexError, OSError):
        return None


def run_and_kill(
    source: Path, out: Path, log: Path, after_epoch: int, fraction: float
) -> tuple[int | None, int | None]:
    """Start training; SIGKILL it ``fraction`` of an epoch's duration after last.pt reaches
    ``after_epoch`` (the duration is the last epoch's, read from the checkpoint).

    Returns (return code, checkpoint epoch at death); the return code is None when the process
    finished before it could be killed.
    """
    proc = start(source, out, log)
    deadline = time.monotonic() + 300
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            progress = checkpoint_progress(out)
            if progress is not None and progress[0] >= after_epoch:
                time.sleep(fraction * progress[1])
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, checkpoint_epoch(out)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model" / "model.pt", map_location="cpu", weights_only=True)


def test_sigkill_at_several_epochs_then_resume_gives_identical_weights(tmp_path, record):
    import json

    source = tmp_path / "idx"
    write_source(source)
    logs = tmp_path / "logs"
    logs.mkdir()
    rng = random.Random(SEED)

    # The uninterrupted runs go alongside the chain (each has its own folder).
    reference = start(source, tmp_path / "reference", logs / "reference.log")
    twin = start(source, tmp_path / "twin", logs / "twin.log")

    out = tmp_path / "killed"
    targets = sorted(rng.sample(range(1, EPOCHS), KILLS))
    kills: list[tuple[int, int | None, float]] = []  # (target, epoch at death, fraction)
    last = 0
    for target in targets:
        target = max(target, last + 1)
        if target >= EPOCHS:
            break
        fraction = round(rng.uniform(0.0, 0.5), 3)
        rc, died_at = run_and_kill(source, out, logs / f"kill-{target}.log", target, fraction)
        assert rc == -signal.SIGKILL, (
            f"the run meant to be killed after epoch {target} ended with {rc} "
            f"(finished before the kill?):\n{(logs / f'kill-{target}.log').read_text()[-2000:]}"
        )
        kills.append((target, died_at, fraction))
        last = died_at or 0

    final = start(source, out, logs / "final.log")
    assert final.wait(300) == 0, (logs / "final.log").read_text()[-3000:]
    assert reference.wait(300) == 0, (logs / "reference.log").read_text()[-3000:]
    assert twin.wait(300) == 0, (logs / "twin.log").read_text()[-3000:]

    ref, got, ref2 = weights(tmp_path / "reference"), weights(out), weights(tmp_path / "twin")
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    repeatable = all(torch.equal(ref[k], ref2[k]) for k in ref)
    metrics = json.loads((out / "metrics.json").read_text())
    ref_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    died = [d for _, d, _ in kills]
    litter = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))
    record(
        "fault: SIGKILL during training",
        f"`vae-pipeline train -S train.epochs={EPOCHS} --out DIR` (CPU, seed 0) SIGKILLed "
        f"{len(kills)} times, {[d for _, _, d in kills]} of an epoch after last.pt reached epochs "
        f"{[t for t, _, _ in kills]}; restarted after each; compared with an uninterrupted run",
        f"checkpoints at death: epochs {died}; final run resumed from epoch "
        f"{metrics['resumed_from_epoch']}; {len(ref)} weight tensors "
        f"{'identical (torch.equal)' if same else 'DIFFERENT'}; test -ELBO "
        f"{metrics['test_neg_elbo']:.4f} vs {ref_metrics['test_neg_elbo']:.4f}; "
        f"temp files left: {litter or 'none'}; two uninterrupted runs "
        f"{'identical' if repeatable else 'DIFFER (model init not seeded)'}",
    )
    assert len(set(died)) >= 2, f"kills landed at {died}: not several different epochs"
    assert all(d is not None and 1 <= d < EPOCHS for d in died), died
    assert died == sorted(died) and metrics["resumed_from_epoch"] == died[-1]
    assert metrics["epochs"] == EPOCHS and ref_metrics["resumed_from_epoch"] == 0
    assert repeatable, (
        "two uninterrupted `vae-pipeline train -S train.seed=0` runs give different weights: "
        "the model is built (and initialised from torch's global RNG) before Trainer seeds "
        "it; seed before build_vae in vae_core/training/run.py::run_training"
    )
    assert same, "resumed weights differ from the uninterrupted run's"
    assert metrics["test_neg_elbo"] == ref_metrics["test_neg_elbo"]
