"""Prefect events for what a run decided, so automations can act on them (deploy the new
champion, tell someone a model was rejected, note a skipped night).

    vae.model.promoted    the gate moved @champion to this version
    vae.model.rejected    the gate (enabled) kept the champion; this version stays challenger
    vae.model.gated       the gate decided without acting on it (dry-run, disabled, or stale:
                          the champion moved while it decided)
    vae.model.up-to-date  nothing changed since this version: no training, no new version

Each names the registered model version as its resource
(``mlflow.model-version.<name>.<version>``), with the decision's figures as payload.
"""

from __future__ import annotations

from typing import Any

RESOURCE_PREFIX = "mlflow.model-version"


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
