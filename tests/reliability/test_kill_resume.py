"""SIGKILL during training: `vae-pipeline train --out DIR` killed twice and restarted resumes
from DIR/checkpoints/last.pt and ends with the weights, tensor for tensor, of an uninterrupted
run with the same seed (CPU). Each kill lands where the process stops itself (a hook reports on
stderr and SIGSTOPs), whatever the machine's speed. A second uninterrupted run tells a resume
problem apart from a run that is not reproducible at all."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO_ROOT, child_env, write_idx_folder

pytestmark = pytest.mark.slow

EPOCHS = 6
#: (where the killed run stops, epoch): the checkpoint at death is then epoch - 1.
KILLS = (("validation", 2), ("checkpoint-write", 4))
SETTINGS = (
    f"data.val_size=100 data.holdout_size=100 train.epochs={EPOCHS} train.device=cpu train.seed=0 "
    "model.hidden_sizes=[32] model.latent_dim=4 train.batch_size=32 train.patience=0"
).split()
#: `vae-pipeline` with a stop point: at ``where`` of epoch ``at`` it writes "STOPPED ..." on
#: stderr and stops itself until the test kills it. Nothing else changes (no RNG is touched).
HOOK = """
import os, signal, sys
import torch
from flows.cli import main
from vae_core.training.trainer import Trainer
where, at = sys.argv[1], int(sys.argv[2])
def stop():
    print(f"STOPPED at {where} of epoch {at}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)
validate, save = Trainer._validate, torch.save
def _validate(self, val_x, epoch):
    if where == "validation" and epoch + 1 == at:
        stop()
    return validate(self, val_x, epoch)
def checkpoint_save(obj, f, *args, **kwargs):
    save(obj, f, *args, **kwargs)
    if where == "checkpoint-write" and isinstance(obj, dict) and obj.get("epoch") == at:
        f.flush()
        stop()
Trainer._validate, torch.save = _validate, checkpoint_save
sys.exit(main(sys.argv[3:]))
"""


#: The same thread count in every run: CPU kernels are then bit-for-bit repeatable.
ENV = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def train_args(source: Path, out: Path) -> list[str]:
    settings = [*SETTINGS, f"data.source={source}"]
    return ["train", *(arg for kv in settings for arg in ("-S", kv)), "--out", str(out)]


def run_and_kill(source: Path, out: Path, log: Path, where: str, at: int) -> tuple[int, str]:
    """Start training with the stop hook, SIGKILL it once it reports that it stopped; returns
    (return code, the line it stopped at)."""
    cmd = [sys.executable, "-c", HOOK, where, str(at), *train_args(source, out)]
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    stopped = ""
    with log.open("w") as record:
        for line in proc.stderr:
            record.write(line)
            if line.startswith("STOPPED"):
                stopped = line.strip()
                os.kill(proc.pid, signal.SIGKILL)
                break
        record.write(proc.stderr.read())
    proc.wait(60)
    return proc.returncode, stopped


def test_sigkill_twice_then_resume_gives_identical_weights(tmp_path, start_process, record):
    source = tmp_path / "idx"
    write_idx_folder(source, 600, 100, learnable=True)
    exe = [sys.executable, "-m", "flows.cli"]

    def start(name: str, out: Path):
        return start_process(name, [*exe, *train_args(source, out)], env=ENV, cwd=REPO_ROOT)

    # The uninterrupted runs go alongside the chain (each has its own folder).
    reference = start("reference", tmp_path / "reference")
    twin = start("twin", tmp_path / "twin")

    out, kills = tmp_path / "killed", []
    for where, at in KILLS:
        log = tmp_path / f"kill-{at}.log"
        rc, stopped = run_and_kill(source, out, log, where, at)
        assert rc == -signal.SIGKILL and stopped, log.read_text()[-2000:]
        temp = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp"))
        epoch = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["epoch"]
        kills.append((stopped, int(epoch), temp))

    final = start("final", out)
    for proc in (final, reference, twin):
        assert proc.popen.wait(300) == 0, proc.tail()

    folders = (tmp_path / "reference", out, tmp_path / "twin")
    ref, got, ref2 = (torch.load(d / "model" / "model.pt", weights_only=True) for d in folders)
    same = ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    repeatable = all(torch.equal(ref[k], ref2[k]) for k in ref)
    ref_metrics, metrics = (json.loads((d / "metrics.json").read_text()) for d in folders[:2])
    record(
        "fault: SIGKILL during training",
        f"`vae-pipeline train` ({EPOCHS} epochs, CPU) SIGKILLed after epoch 2's training and "
        "inside epoch 4's checkpoint write, restarted each time; compared with a clean run",
        f"at death (stop point, last.pt epoch, temp files): {kills}; resumed from epoch "
        f"{metrics['resumed_from_epoch']}; weights identical: {same}; test -ELBO "
        f"{metrics['test_neg_elbo']:.4f} vs {ref_metrics['test_neg_elbo']:.4f}; two clean runs "
        f"identical: {repeatable}",
    )
    # Killed before epoch 2's checkpoint: epoch 1 stays, no write was under way.
    assert kills[0][1:] == (1, []), kills
    # Killed mid-write: last.pt is still the whole epoch-3 checkpoint, the half-done write is a
    # hidden temporary file beside it (never read as a checkpoint).
    assert kills[1][1] == 3 and len(kills[1][2]) == 1, kills
    assert kills[1][2][0].startswith(".last.pt."), kills
    assert not list((out / "checkpoints").glob("*.tmp")), "the resumed run kept a stale write"
    assert metrics["resumed_from_epoch"] == 3 and ref_metrics["resumed_from_epoch"] == 0
    assert metrics["epochs"] == EPOCHS
    assert repeatable, "two uninterrupted runs with train.seed=0 give different weights"
    assert same, "resumed weights differ from the uninterrupted run's"
    assert metrics["test_neg_elbo"] == ref_metrics["test_neg_elbo"]
