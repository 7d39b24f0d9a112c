"""Run DVC stages as subprocesses: DVC 3 has no stable Python API for `repro`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vae_core.errors import VaeError

#: What the stage entry points (flows.stages) exit with for bad data or parameters.
BAD_INPUT_MARK = "exited with 2"


class DvcError(VaeError, RuntimeError):
    """A `dvc` command failed; the message carries DVC's own explanation."""

    @property
    def bad_input(self) -> bool:
        """A stage refused its data or parameters: trying again cannot help."""
        return BAD_INPUT_MARK in str(self)


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
        lines = [line for line in (out.stderr + out.stdout).splitlines() if line.strip()]
        # A stage's own one-line reason ("error: <file>: <what>") first, DVC's account after.
        reason = next((ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")), "")
        detail = "\n".join(lines)
        raise DvcError(f"`dvc {' '.join(args)}` failed in {cwd}: {reason}\n{detail}".strip())
    return out.stdout


def repro(*stages: str, cwd: Path) -> str:
    """`dvc repro [stages]`: re-runs only the stages whose deps or params changed."""
    return dvc("repro", *stages, cwd=cwd)
