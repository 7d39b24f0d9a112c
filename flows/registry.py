"""The model registry: versions, the promotion gate, and manual promote / rollback.

Aliases, not the deprecated stages: `champion` is what `models:/<name>@champion` serves,
`challenger` the newest registered version, `previous-champion` the version a rollback
returns to. Every decision, automatic or manual, is written on the versions it touches (tags
and description), so the registry page alone says why a version is or is not champion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import mlflow
import numpy as np
import torch
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from flows.model_io import load_vae_with_config

ALIAS_CHAMPION = "champion"
ALIAS_CHALLENGER = "challenger"
ALIAS_PREVIOUS = "previous-champion"
GATE_MODES = ("disabled", "dry-run", "enabled")
DESCRIPTION_LIMIT = 5000  # MLflow's SQL store keeps at most 5000 characters per description.

# The figures of a decision, in the order they are reported.
FIGURE_KEYS = (
    "challenger_mean_nll",
    "champion_mean_nll",
    "mean_improvement",
    "ci_low",
    "ci_high",
    "n",
    "floor_nll",
    "margin_nats",
    "confidence",
    "bootstrap_samples",
)


class RegistryError(RuntimeError):
    """A registry action that cannot be done: no such model or version, nothing to roll back."""


def registered_model_name(dataset: str) -> str:
    """One registered model per dataset; other tools rely on this exact name."""
    return f"{dataset}-vae"


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _client(client: MlflowClient | None) -> MlflowClient:
    return client or MlflowClient()


def _aliases(client: MlflowClient, model_name: str) -> dict[str, str]:
    try:
        return {a: str(v) for a, v in client.get_registered_model(model_name).aliases.items()}
    except MlflowException as exc:
        raise RegistryError(f"registered model {model_name!r} not found: {exc.message}") from exc


def _require_version(client: MlflowClient, model_name: str, version: str | int) -> ModelVersion:
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        raise RegistryError(
            f"model {model_name!r} has no version {version!r}: {exc.message}"
        ) from exc


def _append_description(
    client: MlflowClient, model_name: str, version: str, paragraph: str
) -> None:
    """Append a paragraph, dropping the oldest ones after the first (registration) to fit."""
    current = _require_version(client, model_name, version).description or ""
    parts = [p for p in current.split("\n\n") if p.strip()] + [paragraph.strip()]
    while len("\n\n".join(parts)) > DESCRIPTION_LIMIT and len(parts) > 2:
        del parts[1]
    text = "\n\n".join(parts)[-DESCRIPTION_LIMIT:]
    client.update_model_version(model_name, version, description=text)


def _set_tags(client: MlflowClient, model_name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))


def register_version(
    run_id: str,
    model_name: str,
    artifact_name: str,
    tags: dict,
    description: str,
    model_uri: str | None = None,
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
    client.set_registered_model_alias(model_name, ALIAS_CHALLENGER, version)
    return client.get_model_version(model_name, version)


@dataclass(frozen=True)
class GateDecision:
    """Whether to promote, why, and the numbers behind it (nats per image)."""

    promote: bool
    reason: str
    figures: dict[str, float | int | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return "promote" if self.promote else "reject"


def _bootstrap_means(diff: np.ndarray, samples: int, seed: int) -> np.ndarray:
    """Means of `samples` resamples of diff with replacement, in chunks of bounded memory."""
    rng = np.random.default_rng(seed)
    n = len(diff)
    chunk = max(1, 4_000_000 // n)
    out = np.empty(samples, dtype=np.float64)
    for start in range(0, samples, chunk):
        b = min(chunk, samples - start)
        out[start : start + b] = diff[rng.integers(0, n, size=(b, n))].mean(axis=1)
    return out


def evaluate_gate(
    challenger_nll: np.ndarray,
    champion_nll: np.ndarray | None,
    *,
    floor_nll: float,
    margin_nats: float,
    bootstrap_samples: int,
    confidence: float,
    seed: int,
) -> GateDecision:
    """Decide on per-example NLLs of the same test examples, in the same order (paired).

    No champion: promote iff the challenger's mean NLL meets the floor. Otherwise promote iff
    the floor is met, the one-sided bootstrap lower bound (at `confidence`) of the mean
    improvement (champion minus challenger) is above 0, and the mean improvement exceeds the
    margin. ci_low/ci_high are the (1 - confidence) and confidence quantiles of the bootstrap.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"promote.confidence: expected a number in (0, 1), found {confidence}")
    if bootstrap_samples < 1:
        raise ValueError(
            f"promote.bootstrap_samples: expected an integer >= 1, found {bootstrap_samples}"
        )
    challenger = np.asarray(challenger_nll, dtype=np.float64).ravel()
    if challenger.size == 0:
        raise ValueError("challenger_nll: expected at least one example, found none")
    figures: dict[str, float | int | None] = {
        "challenger_mean_nll": float(challenger.mean()),
        "champion_mean_nll": None,
        "mean_improvement": None,
        "ci_low": None,
        "ci_high": None,
        "n": int(challenger.size),
        "floor_nll": float(floor_nll),
        "margin_nats": float(margin_nats),
        "confidence": float(confidence),
        "bootstrap_samples": int(bootstrap_samples),
    }
    if not np.isfinite(challenger).all():
        return GateDecision(False, "challenger NLL has non-finite values: not promoted", figures)
    mean = figures["challenger_mean_nll"]
    meets_floor = mean <= floor_nll
    floor_text = f"challenger mean NLL {mean:.3f} {'<=' if meets_floor else '>'} floor {floor_nll}"
    if champion_nll is None:
        verdict = "promoted" if meets_floor else "not promoted"
        return GateDecision(meets_floor, f"no champion yet; {floor_text}: {verdict}", figures)

    champion = np.asarray(champion_nll, dtype=np.float64).ravel()
    if champion.shape != challenger.shape:
        raise ValueError(
            f"champion_nll: expected {challenger.size} paired examples, found {champion.size}"
        )
    figures["champion_mean_nll"] = float(champion.mean())
    if not np.isfinite(champion).all():
        return GateDecision(
            False, "champion NLL has non-finite values: cannot compare, not promoted", figures
        )
    diff = champion - challenger  # > 0: the challenger is better on that example
    boot = _bootstrap_means(diff, int(bootstrap_samples), int(seed))
    improvement = float(diff.mean())
    ci_low = float(np.quantile(boot, 1.0 - confidence))
    ci_high = float(np.quantile(boot, confidence))
    figures |= {"mean_improvement": improvement, "ci_low": ci_low, "ci_high": ci_high}
    compare = (
        f"improvement {improvement:.3f} nats (champion {figures['champion_mean_nll']:.3f} - "
        f"challenger {mean:.3f}, n={challenger.size}), {confidence:.0%} lower bound {ci_low:.3f}"
    )
    failures = []
    if not meets_floor:
        failures.append(floor_text)
    if not ci_low > 0.0:
        failures.append(f"improvement not significant (lower bound {ci_low:.3f} <= 0)")
    if not improvement > margin_nats:
        failures.append(f"improvement {improvement:.3f} <= margin {margin_nats}")
    if failures:
        return GateDecision(False, f"not promoted: {'; '.join(failures)}; {compare}", figures)
    return GateDecision(True, f"promoted: {compare}, above margin {margin_nats}", figures)


def compare_on_same_data(
    challenger_uri: str,
    champion_uri: str,
    test_x: torch.Tensor,
    k: int,
    seed: int,
    *,
    indices: np.ndarray | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-example IWAE NLL (nats) of both models on the same frozen test tensor, paired.

    Both are loaded here (load_vae, no pickle) and scored in this process with the same seeded
    importance samples per example (`indices` are the examples' positions in the full test
    set, which seed them), so the difference reflects the models, not the noise.
    """
    from vae_core.evaluation.likelihood import iwae_log_likelihood

    challenger, challenger_cfg = load_vae_with_config(challenger_uri)
    champion, champion_cfg = load_vae_with_config(champion_uri)
    for key in ("likelihood", "data_variant"):
        a, b = challenger_cfg.get(key), champion_cfg.get(key)
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"cannot compare NLLs: challenger {key}={a!r} but champion {key}={b!r}"
            )
    results = []
    for model in (challenger, champion):
        log_px = iwae_log_likelihood(model.to(device), test_x, k, seed=seed, indices=indices)
        results.append(-log_px)
    return results[0], results[1]


def _figure_tags(figures: dict) -> dict[str, str]:
    tags = {}
    for key in FIGURE_KEYS:
        value = figures.get(key)
        if value is None:
            continue
        tags[f"gate.{key}"] = str(value) if isinstance(value, int) else f"{value:.10g}"
    return tags


def apply_gate(
    client: MlflowClient,
    model_name: str,
    version: str | int,
    decision: GateDecision | None,
    mode: str,
) -> bool:
    """Record the gate on the version and, in mode "enabled", move the aliases.

    "disabled" records only that the gate is off; "dry-run" records the decision and moves
    nothing; "enabled" makes a promoted version champion and the old champion
    previous-champion. Returns whether the aliases moved.
    """
    if mode not in GATE_MODES:
        raise ValueError(f"promote.mode: expected one of {GATE_MODES}, found {mode!r}")
    version = str(version)
    _require_version(client, model_name, version)
    if mode == "disabled":
        tags = {
            "gate.mode": mode,
            "gate.decision": "not-evaluated",
            "gate.reason": "the promotion gate is disabled (promote.mode=disabled)",
            "gate.applied": "false",
            "gate.at": _now(),
        }
        _set_tags(client, model_name, version, tags)
        _append_description(
            client, model_name, version, "Promotion gate: disabled; aliases unchanged."
        )
        return False
    if decision is None:
        raise ValueError(f"apply_gate: mode {mode!r} needs a GateDecision, found None")

    moved = mode == "enabled" and decision.promote
    previous = None
    if moved:
        previous = _aliases(client, model_name).get(ALIAS_CHAMPION)
        if previous is not None and previous != version:
            client.set_registered_model_alias(model_name, ALIAS_PREVIOUS, previous)
            _set_tags(client, model_name, previous, {"gate.replaced_by": version})
        client.set_registered_model_alias(model_name, ALIAS_CHAMPION, version)
    tags = {
        "gate.mode": mode,
        "gate.decision": decision.label,
        "gate.reason": decision.reason,
        "gate.applied": str(moved).lower(),
        "gate.at": _now(),
        **_figure_tags(decision.figures),
    }
    if moved and previous is not None and previous != version:
        tags["gate.previous_champion"] = previous
    _set_tags(client, model_name, version, tags)
    if mode == "dry-run":
        outcome = f"dry-run, nothing moved; would {decision.label}"
    else:
        outcome = "now champion" if moved else "not promoted"
    _append_description(
        client, model_name, version, f"Promotion gate ({mode}): {outcome}. {decision.reason}"
    )
    return moved


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
        "manual.at": _now(),
        **{f"manual.{k}": v for k, v in extra.items()},
    }


def _set_manual_tags(client: MlflowClient, model_name: str, version: str, tags: dict) -> None:
    """Record a manual action; manual.* tags of an earlier action that this one lacks are
    removed, so a version's manual.* tags always describe its latest manual action."""
    mv = client.get_model_version(model_name, version)
    for key in mv.tags:
        if key.startswith("manual.") and key not in tags:
            client.delete_model_version_tag(model_name, version, key)
    _set_tags(client, model_name, version, tags)


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
    _require_version(client, model_name, version)
    current = _aliases(client, model_name).get(ALIAS_CHAMPION)
    if current == version:
        raise RegistryError(f"model {model_name!r} version {version} is already champion")
    if current is not None:
        client.set_registered_model_alias(model_name, ALIAS_PREVIOUS, current)
        _set_manual_tags(
            client, model_name, current, _manual_tags("demoted", reason, actor, replaced_by=version)
        )
        _append_description(
            client,
            model_name,
            current,
            f"Manual promotion of version {version} by {actor} at {_now()}: this version is "
            f"now previous-champion. Reason: {reason}",
        )
    client.set_registered_model_alias(model_name, ALIAS_CHAMPION, version)
    _set_manual_tags(
        client,
        model_name,
        version,
        _manual_tags("promote", reason, actor, previous_champion=current or ""),
    )
    _append_description(
        client,
        model_name,
        version,
        f"Manually promoted to champion by {actor} at {_now()} (was: version "
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
    aliases = _aliases(client, model_name)
    target = aliases.get(ALIAS_PREVIOUS)
    if target is None:
        raise RegistryError(
            f"nothing to roll back to: model {model_name!r} has no version aliased "
            f"{ALIAS_PREVIOUS!r}"
        )
    _require_version(client, model_name, target)
    current = aliases.get(ALIAS_CHAMPION)
    client.set_registered_model_alias(model_name, ALIAS_CHAMPION, target)
    if current is not None and current != target:
        client.set_registered_model_alias(model_name, ALIAS_PREVIOUS, current)
        _set_manual_tags(
            client,
            model_name,
            current,
            _manual_tags("rolled-back", reason, actor, replaced_by=target),
        )
        _append_description(
            client,
            model_name,
            current,
            f"Rolled back by {actor} at {_now()}: champion returned to version {target}; "
            f"this version is now previous-champion. Reason: {reason}",
        )
    else:
        client.delete_registered_model_alias(model_name, ALIAS_PREVIOUS)
    _set_manual_tags(
        client,
        model_name,
        target,
        _manual_tags("rollback-to", reason, actor, replaced=current or ""),
    )
    _append_description(
        client,
        model_name,
        target,
        f"Champion again after a rollback by {actor} at {_now()} (from version "
        f"{current or 'none'}). Reason: {reason}",
    )
    new_previous = current if current is not None and current != target else None
    return AliasChange(model_name, "rollback", target, new_previous)


def champion_version(model_name: str, *, client: MlflowClient | None = None) -> str | None:
    """The version aliased champion, or None when the model or the alias does not exist."""
    client = _client(client)
    try:
        return _aliases(client, model_name).get(ALIAS_CHAMPION)
    except RegistryError:
        return None
