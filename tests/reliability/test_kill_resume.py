"""SIGKILL during training: `vae-pipeline train --out DIR` killed at several epochs and
started again each time resumes from DIR/checkpoints/last.pt and ends with weights identical,
tensor for tensor, to those of an uninterrupted run with the same seed (CPU).

One output folder goes through the whole chain: killed after epoch 2, resumed and killed after
epoch 4, then resumed to the end. Each kill lands at a point the process itself reports: the
moment it writes "epoch k/6 ..." (training of epoch k done), so it hits the validation or the
checkpoint write of that epoch, on a fast machine or a slow one alike; nothing races a clock.
Two uninterrupted runs go alongside: the reference, and a second one that tells a resume
problem apart from a run that is not reproducible in the first place.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import torch
from synthetic_digits import write_digit_folder

REPO_ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 6
#: Kill after these epochs: two apart, so the checkpoints at death (that epoch's, or the one
#: before if its write had not finished) are different epochs, all before the last.
KILL_AFTER = (2, 4)


def write_source(folder: Path) -> None:
    write_digit_folder(folder, 800, 200)


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


def run_and_kill(source: Path, out: Path, log: Path, after_epoch: int) -> tuple[int, int | None]:
    """Start training and SIGKILL it the moment it reports that it finished training epoch
    ``after_epoch`` (the per-epoch line it writes to stderr), while it validates and writes
    that epoch's checkpoint. Returns (return code, checkpoint epoch at death)."""
    proc = subprocess.Popen(
        command(source, out),
        cwd=REPO_ROOT,
        env=env(),
        stdout=log.with_suffix(".out").open("ab"),
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    with log.open("a") as record:
        for line in proc.stderr:
            record.write(line)
            if line.startswith(f"epoch {after_epoch}/{EPOCHS} "):
                os.kill(proc.pid, signal.SIGKILL)
                break
        record.write(proc.stderr.read())
    proc.wait(60)
    return proc.returncode, checkpoint_epoch(out)


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "model" / "model.pt", map_location="cpu", weights_only=True)


def test_sigkill_at_several_epochs_then_resume_gives_identical_weights(tmp_path, record):
    import json

    source = tmp_path / "idx"
    write_source(source)
    logs = tmp_path / "logs"
    logs.mkdir()

    # The uninterrupted runs go alongside the chain (each has its own folder).
    reference = start(source, tmp_path / "reference", logs / "reference.log")
    twin = start(source, tmp_path / "twin", logs / "twin.log")

    out = tmp_path / "killed"
    kills: list[tuple[int, int | None]] = []  # (target, epoch at death)
    for target in KILL_AFTER:
        rc, died_at = run_and_kill(source, out, logs / f"kill-{target}.log", target)
        assert rc == -signal.SIGKILL, (
            f"the run meant to be killed after epoch {target} ended with {rc} "
            f"(finished before the kill?):\n{(logs / f'kill-{target}.log').read_text()[-2000:]}"
        )
        kills.append((target, died_at))

    final = start(source, out, logs / "final.log")
    assert final.wait(300) == 0, (logs / "final.log").read_text()[-3000:]
    assert reference.wait(300) == 0, (logs / "reference.log").read_text()[-3000:]
    assert twin.wait(300) == 0, (logs / "twin.log").read_text()[-3000:]

    ref, got, ref2 = weights(tmp_path / "reference"), weights(out), weights(tmp_path / "twin")
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    repeatable = all(torch.equal(ref[k], ref2[k]) for k in ref)
    metrics = json.loads((out / "metrics.json").read_text())
    ref_metrics = json.loads((tmp_path / "reference" / "metrics.json").read_text())
    died = [d for _, d in kills]
    litter = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("."))
    record(
        "fault: SIGKILL during training",
        f"`vae-pipeline train -S train.epochs={EPOCHS} --out DIR` (CPU, seed 0) SIGKILLed "
        f"{len(kills)} times, each the moment it reported the end of training epochs "
        f"{[t for t, _ in kills]}; restarted after each; compared with an uninterrupted run",
        f"checkpoints at death: epochs {died}; final run resumed from epoch "
        f"{metrics['resumed_from_epoch']}; {len(ref)} weight tensors "
        f"{'identical (torch.equal)' if same else 'DIFFERENT'}; test -ELBO "
        f"{metrics['test_neg_elbo']:.4f} vs {ref_metrics['test_neg_elbo']:.4f}; "
        f"temp files left: {litter or 'none'}; two uninterrupted runs "
        f"{'identical' if repeatable else 'DIFFER (model init not seeded)'}",
    )
    assert len(set(died)) >= 2, f"kills landed at {died}: not several different epochs"
    assert all(d in (t - 1, t) for t, d in kills), kills  # died at the point it reported
    assert died == sorted(died) and metrics["resumed_from_epoch"] == died[-1]
    assert metrics["epochs"] == EPOCHS and ref_metrics["resumed_from_epoch"] == 0
    assert repeatable, (
        "two uninterrupted `vae-pipeline train -S train.seed=0` runs give different weights: "
        "the model is built (and initialised from torch's global RNG) before Trainer seeds "
        "it; seed before build_vae in vae_core/training/run.py::run_training"
    )
    assert same, "resumed weights differ from the uninterrupted run's"
    assert metrics["test_neg_elbo"] == ref_metrics["test_neg_elbo"]
