"""One real Prefect API for the whole test session, shared by every test that runs a flow.

`prefect_test_harness` starts a temporary Prefect server (a subprocess with its own SQLite
database) and points this process's Prefect settings at it; flows called in-process then
report their runs, task runs, logs and artifacts to it, and tests can read them back with
`prefect.client.orchestration.get_client()`. Starting it costs 10-40 s on a busy two-core
machine, so it is started once, lazily, by the session-scoped `prefect_harness` fixture that
tests/conftest.py registers: tests that do not ask for it never pay for it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

#: Seconds to wait for the temporary server (Prefect's own default, 30 s, is too short for a
#: busy CI machine with two cores).
STARTUP_TIMEOUT_S = 120

#: No network here: nothing may try to phone home.
QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def quiet_environment() -> None:
    """Set the no-telemetry variables, leaving any value the caller already chose."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def harness_session() -> Iterator[str]:
    """Generator body of the session fixture: yields the harness's API URL."""
    quiet_environment()
    import prefect.settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=STARTUP_TIMEOUT_S):
        yield str(prefect.settings.PREFECT_API_URL.value())
