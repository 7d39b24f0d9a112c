"""The model registry: names, versions, aliases, and manual promote / rollback.

Aliases, not the deprecated stages: `champion` is what `models:/<name>@champion` serves,
`challenger` the newest registered version, `previous-champion` the version a rollback
returns to. Every decision, automatic (flows.promotion, the gate) or manual (here), is written
on the versions it touches (tags and description), so the registry page alone says why a
version is or is not champion.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.alias_log import move_aliases, registry_lock
from vae_core.errors import VaeError

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
ALIAS_PREVIOUS = "previous-champion"
DESCRIPTION_LIMIT = 5000  # MLflow's SQL store keeps at most 5000 characters per description.


class RegistryError(VaeError, RuntimeError):
    """A registry action that cannot be done: no such model or version, nothing to roll back."""


def registered_model_name(dataset: str) -> str:
    """One registered model per dataset; other tools rely on this exact name."""
    return f"{dataset}-vae"


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _client(client: MlflowClient | None) -> MlflowClient:
    return client or MlflowClient()


def current_aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    try:
        return {a: str(v) for a, v in client.get_registered_model(model_name).aliases.items()}
    except MlflowException as exc:
        raise RegistryError(f"registered model {model_name!r} not found: {exc.message}") from exc


def require_version(client: MlflowClient, model_name: str, version: str | int) -> ModelVersion:
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"model {model_name!r} has no version {version!r}: {exc.message}"
        ) from exc


def append_description(client: MlflowClient, model_name: str, version: str, paragraph: str) -> None:
    """Append a paragraph, dropping the oldest ones after the first (registration) to fit."""
    current = require_version(client, model_name, version).description or ""
    parts = [p for p in current.split("\n\n") if p.strip()] + [paragraph.strip()]
    while len("\n\n".join(parts)) > DESCRIPTION_LIMIT and len(parts) > 2:
        del parts[1]
    text = "\n\n".join(parts)[-DESCRIPTION_LIMIT:]
    client.update_model_version(model_name, version, description=text)


def set_version_tags(client: MlflowClient, model_name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))


def register_version(
    run_id: str,
    model_name: str,
    artifact_name: str,
    tags: dict,
    description: str,
    model_uri: str | None = None,
    actor: str | None = None,
) -> ModelVersion:
    """Register the model logged as `artifact_name` in run `run_id`, aliased `challenger`.

    `model_uri` (the `models:/m-...` URI that log_vae returns) avoids MLflow's detour through
    `runs:/` for a logged model. Uses the global tracking URI (mlflow.set_tracking_uri):
    `mlflow.register_model` also links the logged model to the new version.
    """
    str_tags = {str(k): str(v) for k, v in tags.items()}
    source = model_uri or f"runs:/{run_id}/{artifact_name}"
    mv = mlflow.register_model(source, model_name, tags=str_tags)
    client = MlflowClient()
    version = str(mv.version)
    if description:
        client.update_model_version(
            model_name, version, description=description[:DESCRIPTION_LIMIT]
        )
    actor = actor or f"MLflow run {run_id}"
    with registry_lock(client, model_name, actor):
        move_aliases(
            client,
            model_name,
            {ALIAS_CHALLENGER: version},
            actor=actor,
            action="registered",
            reason=f"newest version, registered from MLflow run {run_id}",
        )
    return client.get_model_version(model_name, version)


@dataclass(frozen=True)
class AliasChange:
    """Where champion and previous-champion point after a manual action."""

    model_name: str
    action: str
    champion: str
    previous_champion: str | None


def _manual_tags(action: str, reason: str, actor: str, **extra: str) -> dict[str, str]:
    return {
        "manual.action": action,
        "manual.reason": reason,
        "manual.actor": actor,
        "manual.at": now(),
        **{f"manual.{k}": v for k, v in extra.items()},
    }


def _set_manual_tags(client: MlflowClient, model_name: str, version: str, tags: dict) -> None:
    """Record a manual action; manual.* tags of an earlier action that this one lacks are
    removed, so a version's manual.* tags always describe its latest manual action."""
    mv = client.get_model_version(model_name, version)
    for key in mv.tags:
        if key.startswith("manual.") and key not in tags:
            client.delete_model_version_tag(model_name, version, key)
    set_version_tags(client, model_name, version, tags)


def _check_words(reason: str, actor: str) -> tuple[str, str]:
    if not reason or not reason.strip():
        raise ValueError("reason: a manual registry action needs a reason, found none")
    if not actor or not actor.strip():
        raise ValueError("actor: a manual registry action needs an actor, found none")
    return reason.strip(), actor.strip()


def promote_version(
    model_name: str,
    version: str | int,
    reason: str,
    actor: str,
    *,
    client: MlflowClient | None = None,
) -> AliasChange:
    """Make `version` champion by hand; the current champion becomes previous-champion."""
    client = _client(client)
    reason, actor = _check_words(reason, actor)
    version = str(version)
    require_version(client, model_name, version)
    with registry_lock(client, model_name, actor):
        return _promote_locked(client, model_name, version, reason, actor)


def _promote_locked(
    client: MlflowClient, model_name: str, version: str, reason: str, actor: str
) -> AliasChange:
    current = current_aliases(client, model_name).get(ALIAS_CHAMPION)
    if current == version:
        raise RegistryError(f"model {model_name!r} version {version} is already champion")
    moves = {ALIAS_CHAMPION: version} | ({ALIAS_PREVIOUS: current} if current else {})
    move_aliases(client, model_name, moves, actor=actor, action="manual promote", reason=reason)
    if current is not None:
        _set_manual_tags(
            client, model_name, current, _manual_tags("demoted", reason, actor, replaced_by=version)
        )
        append_description(
            client,
            model_name,
            current,
            f"Manual promotion of version {version} by {actor} at {now()}: this version is "
            f"now previous-champion. Reason: {reason}",
        )
    _set_manual_tags(
        client,
        model_name,
        version,
        _manual_tags("promote", reason, actor, previous_champion=current or ""),
    )
    append_description(
        client,
        model_name,
        version,
        f"Manually promoted to champion by {actor} at {now()} (was: version "
        f"{current or 'none'}). Reason: {reason}",
    )
    return AliasChange(model_name, "promote", version, current)


def rollback(
    model_name: str,
    reason: str,
    actor: str,
    *,
    client: MlflowClient | None = None,
) -> AliasChange:
    """Champion goes back to the previous-champion version; the two aliases swap.

    The rolled-back version keeps the previous-champion alias, so a rollback can be undone by
    rolling back again.
    """
    client = _client(client)
    reason, actor = _check_words(reason, actor)
    with registry_lock(client, model_name, actor):
        return _rollback_locked(client, model_name, reason, actor)


def _rollback_locked(client: MlflowClient, model_name: str, reason: str, actor: str) -> AliasChange:
    aliases = current_aliases(client, model_name)
    target = aliases.get(ALIAS_PREVIOUS)
    if target is None:
        raise RegistryError(
            f"nothing to roll back to: model {model_name!r} has no version aliased "
            f"{ALIAS_PREVIOUS!r}"
        )
    require_version(client, model_name, target)
    current = aliases.get(ALIAS_CHAMPION)
    swapped = current is not None and current != target
    moves = {ALIAS_CHAMPION: target, ALIAS_PREVIOUS: current if swapped else None}
    move_aliases(client, model_name, moves, actor=actor, action="rollback", reason=reason)
    if swapped:
        _set_manual_tags(
            client,
            model_name,
            current,
            _manual_tags("rolled-back", reason, actor, replaced_by=target),
        )
        append_description(
            client,
            model_name,
            current,
            f"Rolled back by {actor} at {now()}: champion returned to version {target}; "
            f"this version is now previous-champion. Reason: {reason}",
        )
    _set_manual_tags(
        client,
        model_name,
        target,
        _manual_tags("rollback-to", reason, actor, replaced=current or ""),
    )
    append_description(
        client,
        model_name,
        target,
        f"Champion again after a rollback by {actor} at {now()} (from version "
        f"{current or 'none'}). Reason: {reason}",
    )
    new_previous = current if current is not None and current != target else None
    return AliasChange(model_name, "rollback", target, new_previous)


#: The tags that say what a version was made from: the same three, the same model.
MATCH_TAGS = ("dvc.processed_md5", "params.hash", "code.hash")


def matching_version(client: MlflowClient, model_name: str, tags: dict[str, str]) -> str | None:
    """The newest version of ``model_name`` made from the same data, parameters and model code
    (the MATCH_TAGS of ``tags``), or None."""
    values = [model_name, *(str(tags[key]) for key in MATCH_TAGS)]
    if any("'" in value for value in values):  # not a name or hash this project writes
        return None
    clauses = [f"name = '{model_name}'"] + [f"tags.`{k}` = '{tags[k]}'" for k in MATCH_TAGS]
    found = client.search_model_versions(" and ".join(clauses))
    return max((str(v.version) for v in found), key=int, default=None)


def champion_version(model_name: str, *, client: MlflowClient | None = None) -> str | None:
    """The version aliased champion, or None when the model or the alias does not exist."""
    client = _client(client)
    try:
        return current_aliases(client, model_name).get(ALIAS_CHAMPION)
    except RegistryError:
        return None
