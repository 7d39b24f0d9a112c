"""Closing the books of a run that died holding the workspace (SIGKILL, a lost worker).

A killed process cannot report its own end: its Prefect flow run stays Running and its MLflow
run RUNNING for ever, and a model version it had just registered would sit ungated. The next
run in the same workspace finds the dead run's journal (`flows.workspace.exclusive` restores
params.yaml and dvc.lock from it) and calls `settle_dead_run` with what the dead run recorded
about itself.
"""

from __future__ import annotations

from typing import Any

from mlflow.tracking import MlflowClient
from prefect import get_run_logger

from flows import tracking


def _reason(dead: dict[str, Any]) -> str:
    return (
        f"its process died holding the workspace {dead.get('workspace', '?')} (pid "
        f"{dead.get('pid', '?')} on {dead.get('host', '?')}, started {dead.get('started', '?')}); "
        f"found by {tracking.prefect_actor()}, which put params.yaml and dvc.lock back"
    )


def _crash_flow_run(flow_run_id: str, reason: str) -> str | None:
    """Mark the dead flow run Crashed if the Prefect API still thinks it runs; returns the
    state it had."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        before = flow_run.state.type.value if flow_run.state else None
        if flow_run.state is None or not flow_run.state.is_final():
            prefect.set_flow_run_state(flow_run_id, Crashed(message=reason), force=True)
        return before


def settle_dead_run(dead: dict[str, Any], client: MlflowClient) -> None:
    """Mark the dead run's Prefect flow run Crashed and its MLflow run FAILED (deleting any
    version it registered), each only if it is still open; log what was done."""
    logger = get_run_logger()
    reason = _reason(dead)
    logger.warning("recovered the workspace from a dead run: %s", reason)
    flow_run_id = dead.get("prefect.flow_run_id")
    if flow_run_id and flow_run_id != tracking.prefect_context()["prefect.flow_run_id"]:
        name = dead.get("prefect.flow_run_name")
        try:
            before = _crash_flow_run(flow_run_id, reason)
            logger.warning("flow run %s (%s): %s -> CRASHED", name, flow_run_id, before)
        except Exception as exc:  # noqa: BLE001 - another Prefect server's run: say so, go on
            logger.warning("flow run %s (%s) left as it is: %s", name, flow_run_id, exc)
    run_id = dead.get("mlflow.run_id")
    if run_id:
        try:
            if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
                tracking.mark_failed(client, run_id, f"WorkerDied: {reason}")
                logger.warning("MLflow run %s -> FAILED", run_id)
        except Exception as exc:  # noqa: BLE001 - another tracking server's run
            logger.warning("MLflow run %s left as it is: %s", run_id, exc)
