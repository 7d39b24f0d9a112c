"""The trials of a sweep: the grid or random points, their params, their keys and what to do
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

import yaml

from flows.params import (
    ParamsError,
    apply_overrides,
    validate_params,
)
from flows.sweep.spec import SweepError, SweepSpec


@dataclass
class Trial:
    """One point of the sweep: its overrides of the base and the full, validated params."""

    index: int
    overrides: dict[str, Any]
    params: dict[str, Any]
    key: str = ""

    @property
    def label(self) -> str:
        return f"t{self.index:02d}"

    def override_strings(self) -> list[str]:
        return [f"{k}={yaml_scalar(v)}" for k, v in self.overrides.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "label": self.label,
            "key": self.key,
            "overrides": self.overrides,
            "params": self.params,
        }


def yaml_scalar(value: Any) -> str:
    """A value as its one-line YAML text (what ``-S key=value`` accepts back)."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def _flatten_choice(entry: str, choice: Any) -> dict[str, Any]:
    return dict(choice) if "." not in entry else {entry: choice}


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


def _combinations(spec: SweepSpec) -> list[dict[str, Any]]:
    entries = list(spec.parameters.items())
    if spec.method == "grid":
        combos = []
        for picks in itertools.product(*(choices for _, choices in entries)):
            overrides: dict[str, Any] = {}
            for (entry, _), choice in zip(entries, picks, strict=True):
                overrides |= _flatten_choice(entry, copy.deepcopy(choice))
            combos.append(overrides)
        return combos
    rng = random.Random(spec.seed)
    combos, seen = [], set()
    attempts = 0
    while len(combos) < (spec.num_trials or 0) and attempts < 50 * (spec.num_trials or 0):
        attempts += 1
        overrides = {}
        for entry, value in entries:
            overrides |= _flatten_choice(entry, _draw(rng, value))
        fingerprint = json.dumps(overrides, sort_keys=True)
        if fingerprint not in seen:  # the same point twice would be one trial key
            seen.add(fingerprint)
            combos.append(overrides)
    return combos


def expand_trials(spec: SweepSpec, base: Mapping[str, Any]) -> list[Trial]:
    """Every trial's overrides applied to a copy of the base params, each validated like
    params.yaml itself (so a bad value is refused before anything runs)."""
    trials = []
    for index, overrides in enumerate(_combinations(spec)):
        params = copy.deepcopy(dict(base))
        try:
            apply_overrides(params, overrides)
            params = validate_params(params)
        except ParamsError as exc:
            shown = " ".join(f"{k}={yaml_scalar(v)}" for k, v in overrides.items())
            raise SweepError(f"trial {index} ({shown}): {exc}") from None
        trials.append(Trial(index, overrides, params))
    if not trials:
        raise SweepError(f"sweep {spec.name!r} defines no trials")
    return trials


def _digest(payload: Any) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trial_key(params: Mapping[str, Any], data_md5: str) -> str:
    """What makes two trainings the same: every parameter, and the exact prepared data."""
    return _digest({"params": params, "data_md5": data_md5})


def sweep_key(spec: SweepSpec, trials: Sequence[Trial]) -> str:
    """What makes two sweep invocations the same sweep: its name and its trials, in order
    (the trials' keys cover the base params and the data)."""
    return _digest({"name": spec.name, "method": spec.method, "trials": [t.key for t in trials]})


def with_keys(trials: Sequence[Trial], data_md5: str) -> list[Trial]:
    for t in trials:
        t.key = trial_key(t.params, data_md5)
    return list(trials)


def same_family(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Figures are on one scale only for the same decoder likelihood and data variant."""
    return (a["model"]["likelihood"], a["train"]["data_variant"]) == (
        b["model"]["likelihood"],
        b["train"]["data_variant"],
    )


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
        if t.key not in existing:
            plan[t.index] = ("new", None)
            continue
        run_id, status, complete = existing[t.key]
        if complete:
            plan[t.index] = ("done", run_id)
        elif status == "FAILED":
            plan[t.index] = ("new", None) if retry_failed else ("keep-failed", run_id)
        else:
            plan[t.index] = ("resume", run_id)
    return plan
