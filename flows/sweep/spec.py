"""The sweep file: its options, their validation (`parse_sweep`) and reading it (`load_sweep`)."""

from __future__ import annotations

import copy
import difflib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from flows.params import (
    KNOWN_KEYS,
    yaml_load,
)

DEFAULT_SWEEP_FILE = "sweep.yaml"
METHODS = ("grid", "random")
#: Sections a trial may vary: the data are prepared once per sweep, so data.*, fetch.* and
#: classifier.* are fixed, and evaluate.* / promote.* must be equal for figures to compare.
SWEEPABLE_SECTIONS = ("model", "train")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
SPEC_KEYS = ("name", "method", "num_trials", "seed", "metric", "parameters")

#: What a sweep can pick its winner by: name -> (metric key in every child run, goal).
SELECTABLE_METRICS: dict[str, tuple[str, str]] = {
    "val_neg_elbo": ("train.best_val_neg_elbo", "min"),
    "test_neg_elbo": ("test_neg_elbo", "min"),
    "test_nll_iwae": ("test_nll_iwae", "min"),
    "sq_fd": ("sq_fd", "min"),
    "sq_kid": ("sq_kid", "min"),
    "sq_precision": ("sq_precision", "max"),
    "sq_recall": ("sq_recall", "max"),
}


class SweepError(ValueError):
    """The sweep file or the trials it defines are not valid."""


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep definition. ``parameters`` maps a dotted key to its choices (a list)
    or a distribution (random only: ``{"log_uniform": [lo, hi]}``), or a group name (no dot) to
    a list of mappings that set several keys together."""

    name: str
    method: str
    metric: str
    parameters: dict[str, Any]
    num_trials: int | None = None
    seed: int = 0

    @property
    def goal(self) -> str:
        return SELECTABLE_METRICS[self.metric][1]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "method": self.method, "metric": self.metric}
        if self.method == "random":
            out |= {"num_trials": self.num_trials, "seed": self.seed}
        out["parameters"] = copy.deepcopy(self.parameters)
        return out


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_key(key: Any, where: str) -> str:
    if not isinstance(key, str) or key not in KNOWN_KEYS:
        hint = _suggest(str(key), KNOWN_KEYS)
        raise SweepError(f"{where}: unknown parameter {key!r}{hint}")
    if key.split(".", 1)[0] not in SWEEPABLE_SECTIONS:
        allowed = ", ".join(s + ".*" for s in SWEEPABLE_SECTIONS)
        raise SweepError(
            f"{where}: {key!r} cannot vary within a sweep: trials share one prepared dataset "
            f"and one evaluation protocol, so only {allowed} keys may vary (set the others for "
            "the whole sweep with -S)"
        )
    return key


def _check_distribution(key: str, value: Mapping) -> None:
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise SweepError(
            f"parameters.{key}: expected a list of values or one of "
            f"{{{', '.join(d + ': [low, high]' for d in DISTRIBUTIONS)}}}, found {dict(value)!r}"
        )
    kind, bounds = next(iter(value.items()))
    ok = (
        isinstance(bounds, list)
        and len(bounds) == 2
        and all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        and bounds[0] < bounds[1]
    )
    if not ok:
        raise SweepError(f"parameters.{key}.{kind}: expected [low, high] with low < high")
    if kind == "log_uniform" and bounds[0] <= 0:
        raise SweepError(f"parameters.{key}.log_uniform: expected low > 0, found {bounds[0]}")
    if kind == "int_uniform" and not all(isinstance(b, int) for b in bounds):
        raise SweepError(f"parameters.{key}.int_uniform: expected integer bounds")


def _check_choices(where: str, choices: Any) -> list:
    if not isinstance(choices, list) or not choices:
        raise SweepError(f"{where}: expected a non-empty list of values, found {choices!r}")
    seen = [json.dumps(c, sort_keys=True, default=str) for c in choices]
    dupes = sorted({s for s in seen if seen.count(s) > 1})
    if dupes:
        raise SweepError(f"{where}: value listed more than once: {', '.join(dupes)}")
    return choices


def parse_sweep(data: Any, *, default_name: str = "sweep", origin: str = "sweep") -> SweepSpec:
    """Validate a ``sweep:`` mapping (the parsed YAML, with or without the ``sweep`` key)."""
    if isinstance(data, Mapping) and set(data) == {"sweep"}:
        data = data["sweep"]
    if not isinstance(data, Mapping):
        raise SweepError(f"{origin}: expected a mapping under 'sweep:', found {data!r}")
    for key in data:
        if key not in SPEC_KEYS:
            hint = _suggest(str(key), SPEC_KEYS)
            raise SweepError(f"{origin}: unknown sweep option {key!r}{hint}")
    name = str(data.get("name") or default_name)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepError(f"{origin}: name {name!r}: use letters, digits, '-', '_' or '.'")
    method = data.get("method", "grid")
    if method not in METHODS:
        raise SweepError(f"{origin}: method {method!r}: expected one of {', '.join(METHODS)}")
    metric = data.get("metric", "val_neg_elbo")
    if metric not in SELECTABLE_METRICS:
        raise SweepError(
            f"{origin}: metric {metric!r}: expected one of {', '.join(SELECTABLE_METRICS)}"
            f"{_suggest(str(metric), list(SELECTABLE_METRICS))}"
        )
    num_trials = data.get("num_trials")
    seed = data.get("seed", 0)
    if method == "random":
        if not isinstance(num_trials, int) or isinstance(num_trials, bool) or num_trials < 1:
            raise SweepError(f"{origin}: method random needs num_trials, an integer >= 1")
    elif num_trials is not None:
        raise SweepError(f"{origin}: num_trials applies to method random only (grid runs all)")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise SweepError(f"{origin}: seed: expected an integer >= 0, found {seed!r}")

    parameters = data.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        raise SweepError(f"{origin}: parameters: expected a mapping of keys to choices")
    owner: dict[str, str] = {}  # dotted key -> the entry that sets it

    def claim(key: str, entry: str) -> None:
        if key in owner:
            raise SweepError(f"{origin}: {key!r} is set by both {owner[key]!r} and {entry!r}")
        owner[key] = entry

    for entry, value in parameters.items():
        where = f"{origin}: parameters.{entry}"
        if isinstance(entry, str) and "." not in entry:  # a group of keys set together
            _check_choices(where, value)
            if not all(isinstance(c, Mapping) and c for c in value):
                raise SweepError(
                    f"{where}: a group (a name without a dot) lists mappings of keys to values, "
                    "e.g. - {model.likelihood: bernoulli, train.data_variant: binarized}"
                )
            keys = set(value[0])
            for choice in value:
                if set(choice) != keys:
                    raise SweepError(
                        f"{where}: every choice must set the same keys ({sorted(keys)}), found "
                        f"{sorted(choice)}"
                    )
            for key in sorted(keys):
                claim(_check_key(key, where), entry)
        else:
            claim(_check_key(entry, where), entry)
            if isinstance(value, Mapping):
                if method != "random":
                    raise SweepError(f"{where}: distributions need method random; list values")
                _check_distribution(entry, value)
            else:
                _check_choices(where, value)
    return SweepSpec(
        name=name,
        method=method,
        metric=metric,
        parameters=copy.deepcopy(dict(parameters)),
        num_trials=num_trials if method == "random" else None,
        seed=seed,
    )


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and validate a sweep file (a ``sweep:`` section)."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, Mapping) or "sweep" not in data:
        raise SweepError(f"{path}: expected a top-level 'sweep:' section")
    return parse_sweep(data["sweep"], default_name=path.stem, origin=str(path))
