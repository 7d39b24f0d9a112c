"""Run DVC stages as subprocesses: DVC 3 has no stable Python API for `repro`."""

from __future__ import annotations

import os
import re
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


def pull(remote: str, cwd: Path) -> str:
    """`dvc pull -r REMOTE --allow-missing`: the stage outputs dvc.lock names that another
    workspace already pushed; what the remote lacks is left for `dvc repro` to make."""
    return dvc("pull", "-r", remote, "--allow-missing", cwd=cwd)


def push(remote: str, cwd: Path) -> str:
    """`dvc push -r REMOTE`: this workspace's stage outputs, for the next workspace to pull."""
    return dvc("push", "-r", remote, cwd=cwd)


def stages_run(log: str) -> list[str]:
    """The stages `dvc repro` ran (not those it found unchanged), from its output."""
    return re.findall(r"^Running stage '([^']+)'", log, flags=re.MULTILINE)


def last_line(log: str) -> str:
    """DVC's closing line of a pull or push ("22 files fetched", "Everything is up to date.")."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    return lines[-1] if lines else ""
