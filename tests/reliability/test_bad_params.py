"""Invalid parameters through the command people type, `vae-pipeline run -S key=value`: each
is refused before any work starts (no Prefect, MLflow or torch imported, nothing written in
the workspace) with one line naming the key, the value and what is allowed.

All cases run as real child processes, started together and collected once, so the module
costs a few seconds however many cases it holds.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

#: Runs the console script's entry point (``vae-pipeline = flows.cli:main``) and reports, on
#: its last stderr line, which heavy packages got imported: proof that no work started.
WRAPPER = (
    "import sys\n"
    "from flows.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    "heavy = sorted({m.split('.')[0] for m in sys.modules} & "
    "{'prefect', 'mlflow', 'torch', 'dvc'})\n"
    "print('HEAVY=' + ','.join(heavy), file=sys.stderr)\n"
    "sys.exit(rc)\n"
)

# (case id, override, fragments the one-line error must contain: key, value, what is allowed)
CASES = [
    ("negative epochs", "train.epochs=-3", ["train.epochs", "-3", "an integer >= 0"]),
    ("zero batch size", "train.batch_size=0", ["train.batch_size", "0", "an integer >= 1"]),
    ("zero latent size", "model.latent_dim=0", ["model.latent_dim", "0", "an integer >= 1"]),
    (
        "zero hidden width",
        "model.hidden_sizes=[64, 0]",
        ["model.hidden_sizes", "[64, 0]", "a non-empty list of integers >= 1"],
    ),
    ("lr zero", "train.lr=0", ["train.lr", "0", "a number in (0, 1]"]),
    ("lr above one", "train.lr=3.0", ["train.lr", "3.0", "a number in (0, 1]"]),
    ("lr NaN", "train.lr=.nan", ["train.lr", "nan", "a number in (0, 1]"]),
    (
        "unknown dataset",
        "data.dataset=cifar10",
        ["data.dataset", "cifar10", "one of mnist, fashion-mnist, kmnist"],
    ),
    (
        "unknown source (typo)",
        "data.source=downlaod",
        ["data.source", "downlaod", "'embedded', 'download', or a folder path", "'download'"],
    ),
    (
        "unknown source (URL)",
        "data.source=https://example.org/mnist.tgz",
        ["data.source", "https://example.org/mnist.tgz", "a URL is not a source"],
    ),
    (
        "unknown likelihood",
        "model.likelihood=gaussian",
        ["model.likelihood", "gaussian", "one of bernoulli, continuous_bernoulli"],
    ),
    ("IWAE k below 1", "evaluate.iwae_k=0", ["evaluate.iwae_k", "0", "an integer >= 1"]),
    (
        "val size too large",
        "data.val_size=4000",
        ["data.val_size", "4000", "data.holdout_size", "training set of 4000 images", "to 3999"],
    ),
    (
        "misspelled key",
        "train.epoch=3",
        ["train.epoch", "3", "unknown parameter", "did you mean 'train.epochs'"],
    ),
    ("wrong type: text", "train.epochs=three", ["train.epochs", "three", "an integer >= 0"]),
    ("wrong type: float", "train.batch_size=12.5", ["train.batch_size", "12.5", "an integer"]),
    ("wrong type: bool", "train.compile=maybe", ["train.compile", "maybe", "true or false"]),
    ("unknown device", "train.device=tpu", ["train.device", "tpu", "auto, cpu, cuda, mps"]),
    (
        "confidence of 1",
        "promote.confidence=1",
        ["promote.confidence", "1", "a number in (0, 1)"],
    ),
    (
        "unknown gate mode",
        "promote.mode=yolo",
        ["promote.mode", "yolo", "one of disabled, dry-run, enabled"],
    ),
    (
        "embedded + other dataset",
        "data.dataset=kmnist",
        ["data.source = 'embedded'", "kmnist", "expected data.dataset 'mnist'"],
    ),
    ("override without value", "train.epochs", ["train.epochs", "key.sub=value"]),
]


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict:
    """Every case started at once in its own copy of params.yaml, then collected."""
    root = tmp_path_factory.mktemp("bad-params")
    procs = {}
    for i, (case, override, _) in enumerate(CASES):
        ws = root / f"ws{i}"
        ws.mkdir()
        shutil.copy2(REPO_ROOT / "params.yaml", ws / "params.yaml")
        shutil.copy2(REPO_ROOT / "dvc.yaml", ws / "dvc.yaml")
        argv = ["run", "--workdir", str(ws), "-S", override]
        start = time.monotonic()
        procs[case] = (
            ws,
            start,
            subprocess.Popen(
                [sys.executable, "-c", WRAPPER, *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(),
            ),
        )
    out = {}
    for case, (ws, start, proc) in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        out[case] = {
            "ws": ws,
            "rc": proc.returncode,
            "stdout": stdout,
            "stderr": stderr,
            "seconds": time.monotonic() - start,
        }
    return out


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    for key in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "PYTHONPATH"):
        env.pop(key, None)
    # If anything did try to reach a server, it would fail loudly rather than start one.
    env["PREFECT_API_URL"] = "http://127.0.0.1:9/api"
    env["MLFLOW_TRACKING_URI"] = "http://127.0.0.1:9"
    return env


def test_at_least_fifteen_cases() -> None:
    assert len(CASES) >= 15


@pytest.mark.parametrize(("case", "override", "fragments"), CASES, ids=[c[0] for c in CASES])
def test_bad_parameter_refused_before_any_work(
    refused: dict, record, helpers, case: str, override: str, fragments
) -> None:
    r = refused[case]
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    heavy = next((ln for ln in lines if ln.startswith("HEAVY=")), "HEAVY=?")[len("HEAVY=") :]
    message = "\n".join(ln for ln in lines if not ln.startswith("HEAVY="))
    created = sorted(p.name for p in r["ws"].iterdir() if p.name not in ("params.yaml", "dvc.yaml"))
    params_same = (r["ws"] / "params.yaml").read_bytes() == (REPO_ROOT / "params.yaml").read_bytes()
    record(
        f"bad param: {case}",
        f"vae-pipeline run -S {override}",
        f"exit {r['rc']} in {r['seconds']:.1f} s ({len(CASES)} at once); heavy imports "
        f"{heavy or 'none'}; new files {created or 'none'}: "
        f"{helpers.short(message.split('.yaml: ', 1)[-1], 90)!r}",
    )
    assert r["rc"] == 2, r["stderr"]
    assert message.startswith("error: ") and "\n" not in message, message
    assert "Traceback" not in r["stderr"]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert heavy == "", f"work started: imported {heavy}"
    assert created == [], f"the refused run created {created}"
    assert params_same, "params.yaml was changed by a refused run"
