"""Prefect events for what a run decided, so automations can act on them (deploy the new
champion, tell someone a model was rejected, note a skipped night).

    vae.model.promoted    the gate moved @champion to this version
    vae.model.rejected    the gate (enabled) kept the champion; this version stays challenger
    vae.model.gated       the gate decided without acting on it (dry-run, disabled, or stale:
                          the champion moved while it decided)
    vae.model.up-to-date  nothing changed since this version: no training, no new version
    vae.data.drift        a scored batch no longer looks like this version's holdout
    vae.data.no-drift     a scored batch still does (flows.scoring, flows.drift)

Each names the registered model version as its resource
(``mlflow.model-version.<name>.<version>``), with the decision's figures as payload.
"""

from __future__ import annotations

from typing import Any

RESOURCE_PREFIX = "mlflow.model-version"


DRIFT_EVENT = "vae.data.drift"
RETRAIN_TRIGGER = "retrain-on-drift"


def retrain_on_drift():
    """The deployment trigger of the retraining deployments: a run on `vae.data.drift` about
    any model version. prefect.yaml declares the same (a test checks they agree);
    `vae-pipeline serve` attaches this one."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    return DeploymentEventTrigger(
        name=RETRAIN_TRIGGER,
        description="retrain when a scored batch drifts from the champion's holdout",
        match={"prefect.resource.id": f"{RESOURCE_PREFIX}.*"},
        expect={DRIFT_EVENT},
    )


def decision_event(gate: dict[str, Any]) -> str:
    """The event name for a gate outcome: promoted or rejected only when the gate acted (a
    dry-run's "would reject" is gated, like its "would promote")."""
    if gate.get("decision") == "promote" and gate.get("applied"):
        return "vae.model.promoted"
    if gate.get("decision") == "reject" and gate.get("mode", "enabled") == "enabled":
        return "vae.model.rejected"
    return "vae.model.gated"


def emit_model_event(event: str, name: str, version: str, payload: dict[str, Any]) -> None:
    """Emit ``event`` about ``name`` version ``version`` (a no-op outside a Prefect API)."""
    from prefect.events import emit_event

    emit_event(
        event=event,
        resource={
            "prefect.resource.id": f"{RESOURCE_PREFIX}.{name}.{version}",
            "prefect.resource.name": f"{name} v{version}",
            "mlflow.registered_model": name,
            "mlflow.version": str(version),
        },
        payload=payload,
    )
