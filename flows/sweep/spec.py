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

from flows.params import KNOWN_KEYS, read_yaml_mapping
from flows.run_record import on_test_set
from vae_core.errors import VaeError

METHODS = ("grid", "random")
#: Sections a trial may vary: the data are prepared once per sweep, so data.*, fetch.* and
#: classifier.* are fixed, and evaluate.* / promote.* must be equal for figures to compare.
SWEEPABLE_SECTIONS = ("model", "train")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
SPEC_KEYS = ("name", "method", "num_trials", "seed", "metric", "parameters")

#: What a sweep can pick its winner by: the figure's MLflow name (in every child run) -> goal.
#: Figures measured on the test set (`run_record.on_test_set`) are reported, never chosen by:
#: choosing by them again and again would make the winner's reported figure optimistic.
SELECTABLE_METRICS: dict[str, str] = {"val/best_neg_elbo": "min"}
DEFAULT_METRIC = "val/best_neg_elbo"


class SweepError(VaeError, ValueError):
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
        return SELECTABLE_METRICS[self.metric]

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


def _is_number(value: Any, integer: bool = False) -> bool:
    return isinstance(value, int if integer else int | float) and not isinstance(value, bool)


def _check_distribution(key: str, value: Mapping) -> None:
    if len(value) != 1 or next(iter(value)) not in DISTRIBUTIONS:
        raise SweepError(
            f"parameters.{key}: expected a list of values or one of "
            f"{{{', '.join(d + ': [low, high]' for d in DISTRIBUTIONS)}}}, found {dict(value)!r}"
        )
    kind, bounds = next(iter(value.items()))
    numbers = isinstance(bounds, list) and all(_is_number(b) for b in bounds)
    if not (numbers and len(bounds) == 2 and bounds[0] < bounds[1]):
        raise SweepError(f"parameters.{key}.{kind}: expected [low, high] with low < high")
    if kind == "log_uniform" and bounds[0] <= 0:
        raise SweepError(f"parameters.{key}.log_uniform: expected low > 0, found {bounds[0]}")
    if kind == "int_uniform" and not all(_is_number(b, integer=True) for b in bounds):
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
    for key in set(data) - set(SPEC_KEYS):
        raise SweepError(f"{origin}: unknown sweep option {key!r}{_suggest(str(key), SPEC_KEYS)}")
    name = str(data.get("name") or default_name)
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise SweepError(f"{origin}: name {name!r}: use letters, digits, '-', '_' or '.'")
    method = data.get("method", "grid")
    if method not in METHODS:
        raise SweepError(f"{origin}: method {method!r}: expected one of {', '.join(METHODS)}")
    metric = str(data.get("metric", DEFAULT_METRIC))
    if on_test_set(metric):
        raise SweepError(
            f"{origin}: metric {metric!r} is measured on the test set, which is only reported "
            "and never decides anything (choosing by it would make the winner's test figure "
            f"optimistic): expected one of {', '.join(SELECTABLE_METRICS)}, a validation figure"
        )
    if metric not in SELECTABLE_METRICS:
        raise SweepError(
            f"{origin}: metric {metric!r}: expected one of {', '.join(SELECTABLE_METRICS)}"
            f"{_suggest(str(metric), list(SELECTABLE_METRICS))}"
        )
    num_trials = data.get("num_trials")
    seed = data.get("seed", 0)
    if method == "random" and not (_is_number(num_trials, integer=True) and num_trials >= 1):
        raise SweepError(f"{origin}: method random needs num_trials, an integer >= 1")
    if method != "random" and num_trials is not None:
        raise SweepError(f"{origin}: num_trials applies to method random only (grid runs all)")
    if not (_is_number(seed, integer=True) and seed >= 0):
        raise SweepError(f"{origin}: seed: expected an integer >= 0, found {seed!r}")

    parameters = data.get("parameters")
    if not isinstance(parameters, Mapping) or not parameters:
        raise SweepError(f"{origin}: parameters: expected a mapping of keys to choices")
    owner: dict[str, str] = {}  # dotted key -> the entry that sets it
    for entry, value in parameters.items():
        where = f"{origin}: parameters.{entry}"
        if isinstance(entry, str) and "." not in entry:  # a group of keys set together
            _check_choices(where, value)
            if not all(isinstance(c, Mapping) and c for c in value):
                raise SweepError(
                    f"{where}: a group (a name without a dot) lists mappings of keys to values, "
                    "e.g. - {model.likelihood: bernoulli, train.data_variant: binarized}"
                )
            keys = sorted(value[0])
            for choice in value:
                if sorted(choice) != keys:
                    raise SweepError(
                        f"{where}: every choice must set the same keys ({keys}), found "
                        f"{sorted(choice)}"
                    )
        else:
            keys = [entry]
        for key in keys:
            if _check_key(key, where) in owner:
                raise SweepError(f"{origin}: {key!r} is set by both {owner[key]!r} and {entry!r}")
            owner[key] = entry
        if "." in str(entry):
            if isinstance(value, Mapping):
                if method != "random":
                    raise SweepError(f"{where}: distributions need method random; list values")
                _check_distribution(entry, value)
            else:
                _check_choices(where, value)
    parameters = copy.deepcopy(dict(parameters))
    return SweepSpec(name, method, metric, parameters, num_trials, seed)


def load_sweep(path: str | os.PathLike[str]) -> SweepSpec:
    """Read and validate a sweep file (a ``sweep:`` section)."""
    path = Path(path)
    data = read_yaml_mapping(path, "sweep file", SweepError)
    if "sweep" not in data:
        raise SweepError(f"{path}: expected a top-level 'sweep:' section")
    return parse_sweep(data["sweep"], default_name=path.stem, origin=str(path))
