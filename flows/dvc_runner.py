"""Run DVC stages as subprocesses: DVC 3 has no stable Python API for `repro`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vae_core.errors import VaeError


class DvcError(VaeError, RuntimeError):
    """A `dvc` command failed; the message carries DVC's own explanation."""


def dvc(*args: str, cwd: Path) -> str:
    """Run `dvc ARGS` in cwd with analytics off; return stdout, raise DvcError on failure."""
    # The stages run `python -m flows.stages`: put this interpreter's bin first on PATH so
    # they use the same environment as the pipeline, activated or not.
    bin_dir = str(Path(sys.executable).parent)
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    exe = Path(bin_dir) / "dvc"
    cmd = [str(exe) if exe.exists() else "dvc", *args]
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        detail = "\n".join(line for line in (out.stderr + out.stdout).splitlines() if line.strip())
        raise DvcError(f"`dvc {' '.join(args)}` failed in {cwd}:\n{detail}")
    return out.stdout


def repro(*stages: str, cwd: Path) -> str:
    """`dvc repro [stages]`: re-runs only the stages whose deps or params changed."""
    return dvc("repro", *stages, cwd=cwd)
