"""Flow runs whose process died are marked Crashed by the Prefect server, not by a later run.

A process killed with SIGKILL (or a machine that vanished) cannot report that its flow run
ended, so the run stays Running and holds its deployment's one concurrency slot until
something notices (PrefectHQ/prefect#16746). Prefect's answer, used here: every flow run's
process sends a `prefect.flow-run.heartbeat` event every `HEARTBEAT_SECONDS`, and a proactive
automation on the server sets a run Crashed when, after a heartbeat, neither another one nor
any state change arrives within `after_s`. Crashed releases the slot, so the next run starts.

`automations.yaml` declares the same automation for `prefect automation create` (a test checks
they agree); `vae-pipeline serve` creates or updates it. The heartbeat interval reaches flow
runs through their environment: importing `flows` sets it (before Prefect reads its settings;
`serve`'s runs inherit it), and prefect.yaml's deployments set it for a worker's runs, which
import Prefect first.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prefect.events.schemas.automations import AutomationCore

AUTOMATION_NAME = "vae-crash-unresponsive-runs"
HEARTBEAT_SECONDS = 30  # Prefect's minimum; its default is 180
HEARTBEAT_VARIABLE = "PREFECT_FLOWS_HEARTBEAT_FREQUENCY"
PREFECT_DEFAULT_HEARTBEAT_SECONDS = 180
UNRESPONSIVE_AFTER_S = 90.0  # three missed heartbeats
# Only this project's flows: other flows on a shared server keep their own policies.
PROJECT_FLOWS = ["training-pipeline", "batch-scoring", "vae-sweep"]


def crash_unresponsive_runs(after_s: float = UNRESPONSIVE_AFTER_S) -> AutomationCore:
    """The automation: a project flow run silent for `after_s` after a heartbeat is Crashed.
    `after_s` must exceed the heartbeat interval this process's runs get, or a live run would
    be crashed between two heartbeats."""
    interval = heartbeat_seconds()  # checked before Prefect, which would refuse it in a traceback
    if after_s <= interval:
        raise ValueError(
            f"--unresponsive-after: expected more than the flow runs' heartbeat interval "
            f"({HEARTBEAT_VARIABLE}={interval}), found {after_s:g} s"
        )
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    return AutomationCore(
        name=AUTOMATION_NAME,
        description=(
            "Mark a flow run of the VAE pipeline Crashed when its process stops sending "
            "heartbeats (killed, or its machine lost), so its deployment's slot is freed."
        ),
        trigger=EventTrigger(
            posture=Posture.Proactive,
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.*"},  # a heartbeat, or any state (final ones included)
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": PROJECT_FLOWS},
            for_each={"prefect.resource.id"},
            threshold=1,
            within=timedelta(seconds=after_s),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {after_s:g} s: its process died (marked by the server)",
            )
        ],
    )


def heartbeat_seconds() -> int:
    """The heartbeat interval the flow runs started from this process get, in seconds."""
    value = os.environ.get(HEARTBEAT_VARIABLE, str(PREFECT_DEFAULT_HEARTBEAT_SECONDS))
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{HEARTBEAT_VARIABLE}: expected whole seconds, found {value!r}") from None


def ensure_automation(automation: AutomationCore) -> str:
    """Create `automation` on the Prefect API, or update the one of the same name, so serving
    again (or with another `after_s`) never leaves two; returns "created", "updated" or
    "unchanged". An identical one is left alone: updating an automation drops the runs it was
    timing, so `serve` started again after a crash would never see the dead run marked."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        for duplicate in existing[1:]:  # e.g. `prefect automation create` run twice
            client.delete_automation(duplicate.id)
        if not existing:
            client.create_automation(automation)
            return "created"
        if AutomationCore.model_validate(existing[0].model_dump()) == automation:
            return "unchanged"
        client.update_automation(existing[0].id, automation)
        return "updated"
