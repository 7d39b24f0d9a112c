"""Run DVC stages as subprocesses (DVC 3 has no stable Python API for `repro`), and the
fetch task's retry policy: the one retry layer of a download."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from flows.stages import EXIT_BAD_INPUT, EXIT_UNAVAILABLE
from vae_core.config import FetchConfig
from vae_core.errors import VaeError

#: How DVC reports a stage command's exit status ("failed to run: <cmd>, exited with 2").
_EXIT_STATUS = re.compile(r"exited with (-?\d+)")
#: The longest wait between two fetch attempts, however many retries params.yaml asks for.
MAX_RETRY_DELAY_S = 600.0
#: Prefect keeps at most this many retry delays (it repeats the last one after them).
_PREFECT_MAX_DELAYS = 50
#: Spread of each wait (Prefect draws it around the delay, at most 1.5 times it), so workspaces
#: that failed together do not all retry at the same moment. Prefect 3.9 applies it to task
#: retries (PrefectHQ/prefect#22203 brought it back to client-side task orchestration).
RETRY_JITTER_FACTOR = 0.5


class DvcError(VaeError, RuntimeError):
    """A `dvc` command failed; the message carries DVC's own explanation."""

    @property
    def stage_exit(self) -> int | None:
        """The exit status of the stage command that failed, when a stage failed."""
        found = _EXIT_STATUS.findall(str(self))
        return int(found[-1]) if found else None

    @property
    def bad_input(self) -> bool:
        """A stage refused its data or parameters: trying again cannot help."""
        return self.stage_exit == EXIT_BAD_INPUT

    @property
    def unavailable(self) -> bool:
        """The fetch stage could not reach its source: another try may work."""
        return self.stage_exit == EXIT_UNAVAILABLE


def worth_retrying(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition for the fetch task: retry anything but bad input (a missing
    folder, a truncated file, a refused URL, a bad value), which would fail the same way."""
    error = state.result(raise_on_failure=False)
    return not (isinstance(error, DvcError) and error.bad_input)


def retry_delays(fetch: FetchConfig) -> list[float]:
    """Exponential backoff from ``fetch.backoff_s``, doubling per retry, each wait at most
    MAX_RETRY_DELAY_S."""
    count = min(fetch.retries, _PREFECT_MAX_DELAYS)
    return [min(fetch.backoff_s * 2**i, MAX_RETRY_DELAY_S) for i in range(count)]


def fetch_retry(fetch: FetchConfig) -> dict[str, Any]:
    """The fetch task's Prefect options for params.yaml's fetch section: ``fetch.retries``
    retries with exponential backoff and jitter, never after bad input. The stage tries once,
    so these retries are the only ones (``@task(**FETCH_RETRY)``, or ``task.with_options``)."""
    return {
        "retries": fetch.retries,
        "retry_delay_seconds": retry_delays(fetch),
        "retry_jitter_factor": RETRY_JITTER_FACTOR,
        "retry_condition_fn": worth_retrying,
    }


#: The fetch task's options for the default fetch section (3 retries after 1, 2 and 4 s).
FETCH_RETRY: dict[str, Any] = fetch_retry(FetchConfig())


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
