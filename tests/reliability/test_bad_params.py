"""Invalid parameters through `vae-pipeline run -S key=value`: each is refused before any work
starts (the pipeline never reached, nothing written) with one `error:` line naming the key, the
value and what is allowed; one case in a child process, which imports nothing heavy and
contacts no server. Every key and bound is tested on `load_params` in test_params.py; these are
what it does not hold: values echoed as typed, suggestions, the cross-field check, `-S` syntax."""

import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from helpers import REPO_ROOT, child_env

from flows.cli import main

# (override, fragments the one-line error must contain: key, value, what is allowed)
CASES = {
    "negative epochs": ("train.epochs=-3", ["train.epochs", "-3", "an integer >= 0"]),
    "wrong type: text": ("train.epochs=three", ["train.epochs", "three", "an integer >= 0"]),
    "wrong type: float": ("train.batch_size=12.5", ["train.batch_size", "12.5", "an integer"]),
    "zero hidden width": (
        "model.hidden_sizes=[64, 0]",
        ["model.hidden_sizes", "[64, 0]", "a non-empty list of integers >= 1"],
    ),
    "lr NaN": ("train.lr=.nan", ["train.lr", "nan", "a number in (0, 1]"]),
    "unknown source (typo)": (
        "data.source=downlaod",
        ["data.source", "downlaod", "'embedded', 'download', or a folder path", "'download'"],
    ),
    "unknown source (URL)": (
        "data.source=https://example.org/mnist.tgz",
        ["data.source", "https://example.org/mnist.tgz", "a URL is not a source"],
    ),
    "val size too large": (
        "data.val_size=4000",
        ["data.val_size", "4000", "data.holdout_size", "training set of 4000 images", "to 3999"],
    ),
    "override without value": ("train.epochs", ["train.epochs", "key.sub=value"]),
}
#: The case the child process runs.
SUBPROCESS_CASE = (
    "train.epoch=3",
    ["train.epoch", "3", "unknown parameter", "did you mean 'train.epochs'"],
)
HEAVY = {"prefect", "mlflow", "torch", "dvc"}
#: The console script's entry point, then which heavy packages it imported (into a file, so
#: stderr is exactly what a user sees).
WRAPPER = (
    "import os, sys\n"
    "from flows.cli import main\n"
    "rc = main(sys.argv[1:])\n"
    f"heavy = {{m.split('.')[0] for m in sys.modules}} & {HEAVY!r}\n"
    "open(os.environ['HEAVY_REPORT'], 'w').write(','.join(sorted(heavy)))\n"
    "sys.exit(rc)\n"
)


def workspace(root: Path) -> Path:
    root.mkdir(exist_ok=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy2(REPO_ROOT / name, root / name)
    return root


def check_refusal(ws: Path, rc: int, stderr: str, fragments: list[str]) -> None:
    """Exit status 2, one `error:` line with every fragment, nothing written in ``ws``."""
    assert rc == 2, stderr
    assert stderr.startswith("error: ") and len(stderr.strip().splitlines()) == 1, stderr
    for fragment in fragments:
        assert fragment in stderr, f"{fragment!r} not in {stderr!r}"
    created = sorted(p.name for p in ws.iterdir() if p.name not in ("params.yaml", "dvc.yaml"))
    assert created == [], f"the refused run created {created}"
    assert (ws / "params.yaml").read_bytes() == (REPO_ROOT / "params.yaml").read_bytes()


@pytest.mark.parametrize("case", list(CASES))
def test_bad_parameter_refused_in_one_line_before_any_work(
    tmp_path: Path, capsys, monkeypatch, record, case: str
) -> None:
    override, fragments = CASES[case]
    ws = workspace(tmp_path / "ws")

    # Reaching the pipeline is the failure: a stand-in module fails the test instead of running.
    def reached(**kwargs):
        pytest.fail(f"the pipeline was started despite {override}: {kwargs}")

    monkeypatch.setitem(sys.modules, "flows.pipeline", SimpleNamespace(training_pipeline=reached))
    with mock.patch.dict("os.environ"):  # the CLI sets its no-telemetry defaults
        rc = main(["run", "--workdir", str(ws), "-S", override])
    stderr = capsys.readouterr().err
    record(
        f"bad param: {case}",
        f"vae-pipeline run -S {override} (flows.cli.main in-process)",
        f"exit {rc}; pipeline not reached: {record.short(stderr.split('.yaml: ', 1)[-1], 90)!r}",
    )
    check_refusal(ws, rc, stderr, fragments)


def test_bad_parameter_child_process_exits_2_without_imports_or_servers(tmp_path, record):
    override, fragments = SUBPROCESS_CASE
    ws = workspace(tmp_path / "ws")
    report = tmp_path / "heavy.txt"
    # A server address that listens but never answers: any connection attempt is queued.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        env = child_env(PREFECT_API_URL=f"{url}/api", MLFLOW_TRACKING_URI=url)
        env["HEAVY_REPORT"] = str(report)
        cmd = [sys.executable, "-c", WRAPPER, "run", "--workdir", str(ws), "-S", override]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        try:
            listener.accept()[0].close()
            contacted = True
        except BlockingIOError:
            contacted = False
    heavy = report.read_text() if report.exists() else "? (no report: main raised)"
    record(
        "bad param: child process",
        f"vae-pipeline run -S {override} as a child process, servers at a silent port",
        f"exit {done.returncode}; heavy imports {heavy or 'none'}; server contacted: "
        f"{contacted}: {record.short(done.stderr.split('.yaml: ', 1)[-1], 90)!r}",
    )
    check_refusal(ws, done.returncode, done.stderr, fragments)
    assert heavy == "", f"work started: imported {heavy}"
    assert not contacted, "the refused run connected to a server"
