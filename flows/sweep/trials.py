"""The trials of a sweep: the grid or random points, their params, their keys, and what to do
with each on a resumed sweep (`plan_trials`)."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flows.params import Params, ParamsError, yaml_scalar
from flows.sweep.spec import SweepError, SweepSpec


@dataclass
class Trial:
    """One point of the sweep: its overrides of the base and the full, validated params."""

    index: int
    overrides: dict[str, Any]
    params: Params
    key: str = ""

    @property
    def label(self) -> str:
        return f"t{self.index:02d}"

    def override_strings(self) -> list[str]:
        return [f"{k}={yaml_scalar(v)}" for k, v in self.overrides.items()]


def _draw(rng: random.Random, value: Any) -> Any:
    if isinstance(value, list):
        return copy.deepcopy(rng.choice(value))
    kind, (low, high) = next(iter(value.items()))
    if kind == "int_uniform":
        return rng.randint(low, high)
    if kind == "log_uniform":
        x = math.exp(rng.uniform(math.log(low), math.log(high)))
    else:
        x = rng.uniform(low, high)
    return float(f"{x:.4g}")  # readable and stable in keys, tables and run names


def _point(entries: Sequence[tuple[str, Any]], picks: Sequence[Any]) -> dict[str, Any]:
    """One trial's overrides: a dotted key's value, or a group's mapping of several keys."""
    out: dict[str, Any] = {}
    for (entry, _), pick in zip(entries, picks, strict=True):
        out |= copy.deepcopy(dict(pick) if "." not in entry else {entry: pick})
    return out


def _combinations(spec: SweepSpec) -> list[dict[str, Any]]:
    entries = list(spec.parameters.items())
    if spec.method == "grid":
        return [_point(entries, picks) for picks in itertools.product(*(v for _, v in entries))]
    rng = random.Random(spec.seed)
    wanted = spec.num_trials or 0
    combos: list[dict[str, Any]] = []
    for _ in range(50 * wanted):
        if len(combos) == wanted:
            break
        point = _point(entries, [_draw(rng, value) for _, value in entries])
        if point not in combos:  # the same point twice would be one trial key
            combos.append(point)
    return combos


def expand_trials(spec: SweepSpec, base: Params) -> list[Trial]:
    """Every trial's overrides applied to the base params, each validated like params.yaml
    itself (so a bad value is refused before anything runs)."""
    trials = []
    for index, overrides in enumerate(_combinations(spec)):
        try:
            trials.append(Trial(index, overrides, base.replace(overrides)))
        except ParamsError as exc:
            shown = " ".join(f"{k}={yaml_scalar(v)}" for k, v in overrides.items())
            raise SweepError(f"trial {index} ({shown}): {exc}") from None
    if not trials:
        raise SweepError(f"sweep {spec.name!r} defines no trials")
    return trials


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trial_key(params: Params, data_md5: str) -> str:
    """What makes two trainings the same: every parameter, and the exact prepared data."""
    return _digest({"params": params.to_dict(), "data_md5": data_md5})


def with_keys(trials: Sequence[Trial], data_md5: str) -> list[Trial]:
    for t in trials:
        t.key = trial_key(t.params, data_md5)
    return list(trials)


def sweep_key(spec: SweepSpec, trials: Sequence[Trial]) -> str:
    """What makes two sweep invocations the same sweep: its name and its trials, in order
    (the trials' keys cover the base params and the data)."""
    return _digest({"name": spec.name, "method": spec.method, "trials": [t.key for t in trials]})


def same_family(a: Params, b: Params) -> bool:
    """Figures are on one scale only for the same decoder likelihood and data variant."""
    return (a.model.likelihood, a.train.data_variant) == (b.model.likelihood, b.train.data_variant)


def plan_trials(
    trials: Sequence[Trial],
    existing: Mapping[str, tuple[str, str, bool]],
    retry_failed: bool = False,
) -> dict[int, tuple[str, str | None]]:
    """What to do with each trial, given its latest child run as (run id, MLflow status,
    complete) by trial key: ``done`` (complete: read back), ``keep-failed`` (FAILED, and no
    --retry-failed), ``resume`` (interrupted: RUNNING, SCHEDULED, KILLED, or FINISHED without
    the completion tag; runs again in the same child run) or ``new`` (no run yet, or a retried
    failure: a new child run, the failed one stays as history)."""
    plan: dict[int, tuple[str, str | None]] = {}
    for t in trials:
        run_id, status, complete = existing.get(t.key, (None, "", False))
        if run_id is None or (status == "FAILED" and not complete and retry_failed):
            plan[t.index] = ("new", None)
        elif complete:
            plan[t.index] = ("done", run_id)
        else:
            plan[t.index] = ("keep-failed" if status == "FAILED" else "resume", run_id)
    return plan
