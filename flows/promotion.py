"""The promotion gate: score the champion on the holdout examples the challenger was evaluated
on, decide with a paired bootstrap, and record the decision on the version (moving aliases in
mode ``enabled``).

The gate decides on the holdout split (carved from the training data by the prepare stage),
never on the test set, which is only reported. The challenger's per-example IWAE NLL is not
computed again: evaluation wrote it together with the holdout indices it covers, and each
example's importance samples are seeded by its index, so scoring the champion on the same
indices with the same k and seed gives figures paired example by example: their difference is
the models', not the noise's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from mlflow.tracking import MlflowClient

from flows.alias_log import move_aliases, registry_lock
from flows.params import Params, PromoteConfig
from flows.registry import (
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    append_description,
    champion_version,
    current_aliases,
    now,
    require_version,
    set_version_tags,
)
from vae_core.errors import VaeError

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


class GateError(VaeError, ValueError):
    """The two models cannot be compared (different likelihoods or data variants)."""


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
    challenger_nll: np.ndarray, champion_nll: np.ndarray | None, gate: PromoteConfig, seed: int
) -> GateDecision:
    """Decide on per-example NLLs of the same test examples, in the same order (paired).

    No champion: promote iff the challenger's mean NLL meets the floor. Otherwise promote iff
    the floor is met, the one-sided bootstrap lower bound (at `confidence`) of the mean
    improvement (champion minus challenger) is above 0, and the mean improvement exceeds the
    margin. ci_low/ci_high are the (1 - confidence) and confidence quantiles of the bootstrap.
    """
    floor_nll, margin_nats = gate.floor_nll, gate.margin_nats
    bootstrap_samples, confidence = gate.bootstrap_samples, gate.confidence
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
    *,
    champion: str | None = None,
    actor: str = "promotion gate",
) -> str:
    """Record the gate on the version and, in mode "enabled", move the aliases.

    "disabled" records only that the gate is off; "dry-run" records the decision and moves
    nothing; "enabled" makes a promoted version champion and the old champion
    previous-champion, compare-and-set: only if ``champion`` (the version the decision was
    scored against, None for none) is still champion once the registry lock is held. If it
    moved meanwhile, nothing moves and the decision is recorded as stale. Returns "moved",
    "stale" or "unchanged".
    """
    version = str(version)
    require_version(client, model_name, version)
    if mode == "disabled":
        tags = {
            "gate.mode": mode,
            "gate.decision": "not-evaluated",
            "gate.reason": "the promotion gate is disabled (promote.mode=disabled)",
            "gate.applied": "false",
            "gate.at": now(),
        }
        set_version_tags(client, model_name, version, tags)
        append_description(
            client, model_name, version, "Promotion gate: disabled; aliases unchanged."
        )
        return "unchanged"
    if decision is None:
        raise ValueError(f"apply_gate: mode {mode!r} needs a GateDecision, found None")

    result, label, reason = "unchanged", decision.label, decision.reason
    if mode == "enabled" and decision.promote:
        with registry_lock(client, model_name, actor):
            now_champion = current_aliases(client, model_name).get(ALIAS_CHAMPION)
            if now_champion != champion:
                result, label = "stale", "stale"
                reason = (
                    f"stale: the champion moved from {champion or 'none'} to "
                    f"{now_champion or 'none'} while the gate scored; nothing moved. The "
                    f"decision against {champion or 'no champion'} was: {decision.reason}"
                )
            else:
                moves = {ALIAS_CHAMPION: version}
                if champion is not None and champion != version:
                    moves[ALIAS_PREVIOUS] = champion
                    set_version_tags(client, model_name, champion, {"gate.replaced_by": version})
                move_aliases(
                    client,
                    model_name,
                    moves,
                    actor=actor,
                    action="gate promote",
                    reason=decision.reason,
                    figures=decision.figures,
                )
                result = "moved"
    moved = result == "moved"
    tags = {
        "gate.mode": mode,
        "gate.decision": label,
        "gate.reason": reason,
        "gate.applied": str(moved).lower(),
        "gate.at": now(),
        **_figure_tags(decision.figures),
    }
    if moved and champion is not None and champion != version:
        tags["gate.previous_champion"] = champion
    set_version_tags(client, model_name, version, tags)
    if mode == "dry-run":
        outcome = f"dry-run, nothing moved; would {decision.label}"
    else:
        outcome = {"moved": "now champion", "stale": "stale"}.get(result, "not promoted")
    said = reason if reason.startswith(outcome) else f"{outcome}. {reason}"  # say it once
    append_description(client, model_name, version, f"Promotion gate ({mode}): {said}")
    return result


def score_champion(
    model_uri: str,
    x: torch.Tensor,
    indices: np.ndarray,
    challenger_config: dict,
    k: int,
    seed: int,
    device: str = "cpu",
    precision: str = "fp32",
) -> np.ndarray:
    """Per-example IWAE NLL (nats) of a registered model on the given test examples, with the
    importance samples seeded by the examples' indices (as evaluation seeds them) on `device`:
    the one the challenger was evaluated on, since a CPU and a CUDA generator draw different
    samples from one seed and the pairs would no longer share them."""
    import torch

    from flows.model_io import load_vae_with_config
    from vae_core.evaluation.likelihood import iwae_log_likelihood

    where = torch.device(device)
    if where.type == "cuda" and not torch.cuda.is_available():
        raise GateError(
            f"the challenger was evaluated on {device}, which this machine lacks: the champion "
            "must be scored there with the same importance samples (run the gate on that machine)"
        )
    model, config = load_vae_with_config(model_uri)
    model, x = model.to(where), x.to(where)
    for key in ("likelihood", "data_variant"):
        a, b = challenger_config.get(key), config.get(key)
        if a is not None and b is not None and a != b:
            raise GateError(f"cannot compare NLLs: challenger {key}={a!r} but champion {key}={b!r}")
    return -iwae_log_likelihood(model, x, k, seed=seed, indices=indices, precision=precision)


def gate_and_apply(
    client: MlflowClient,
    name: str,
    version: str,
    eval_dir: Path,
    processed: Path,
    params: Params,
    actor: str = "promotion gate",
) -> dict:
    """Run the gate for ``name`` version ``version`` under ``params.promote``; the outcome."""
    scored = decide(client, name, version, eval_dir, processed, params)
    return apply_decision(client, name, version, scored, params.promote.mode, actor)


def decide(
    client: MlflowClient, name: str, version: str, eval_dir: Path, processed: Path, params: Params
) -> dict:
    """The gate's scoring half: the decision and the champion it was made against (None with
    the gate disabled). Nothing in the registry changes here."""
    from vae_core.data import load_processed
    from vae_core.evaluation.report import load_per_example
    from vae_core.training.run import split_inputs

    if params.promote.mode == "disabled":
        return {"decision": None, "champion": None}
    challenger_nll, indices, metrics = load_per_example(eval_dir, "holdout")
    champion = champion_version(name, client=client)
    champion_nll = None
    if champion is not None and champion != version:
        x = split_inputs(load_processed(processed), "holdout", params.train.data_variant)[indices]
        challenger_config = {
            "likelihood": metrics["likelihood"],
            "data_variant": metrics["data_variant"],
        }
        champion_nll = score_champion(
            f"models:/{name}/{champion}",
            x,
            indices,
            challenger_config,
            params.evaluate.iwae_k,
            params.evaluate.seed,
            device=metrics.get("device", "cpu"),
            precision=metrics.get("iwae_precision", "fp32"),
        )
    decision = evaluate_gate(challenger_nll, champion_nll, params.promote, params.evaluate.seed)
    return {"decision": decision, "champion": champion}


def apply_decision(
    client: MlflowClient, name: str, version: str, scored: dict, mode: str, actor: str
) -> dict:
    """The gate's registry half: record and (compare-and-set) move; the outcome as a dict."""
    decision: GateDecision | None = scored["decision"]
    result = apply_gate(
        client, name, version, decision, mode, champion=scored["champion"], actor=actor
    )
    if decision is None:
        return {
            "decision": "not-evaluated",
            "reason": "promotion gate disabled",
            "applied": False,
            "mode": mode,
        }
    tags = client.get_model_version(name, version).tags
    return {
        "mode": mode,
        "decision": tags["gate.decision"],
        "reason": tags["gate.reason"],
        "applied": result == "moved",
        "champion_before": scored["champion"],
        "figures": decision.figures,
    }
