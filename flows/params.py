"""params.yaml as one typed, frozen tree: read it, apply ``key.sub=value`` overrides, check
every value once, write overrides back keeping the comments.

    params = load_params("params.yaml", ["train.epochs=3"])
    params.train.epochs, params.model.latent_dim, params.evaluate.iwae_k

Each section is a dataclass whose fields carry their rules (vae_core.config for the library's
sections, ``PromoteConfig`` below for the gate); building the tree is the only check, so code
downstream trusts what it is given. Overrides work like ``dvc exp run -S key=value``: the value
is parsed as YAML, the key must already exist (a typo is refused with the nearest known key),
and ``write_params`` applies them to the file itself, so the DVC stages see the values a run
records.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import io
import json
import os
import re
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml

from vae_core.atomic import atomic_write_text
from vae_core.config import (
    ClassifierTrainConfig,
    ConfigError,
    DataConfig,
    EvalConfig,
    FetchConfig,
    Section,
    TrainConfig,
    VAEConfig,
    integer,
    number,
    one_of,
    setting,
)
from vae_core.errors import VaeError

DEFAULT_PATH = "params.yaml"
GATE_MODES = ("disabled", "dry-run", "enabled")


class ParamsError(ConfigError):
    """params.yaml or an override is missing, unknown, malformed or out of range."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader plus YAML 1.2 floats: ``1e-3`` is a number, as in DVC (ruamel),
    not the string YAML 1.1 makes of it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def yaml_load(text: str) -> Any:
    """Parse YAML the way params.yaml is read everywhere (safe, YAML 1.2 floats)."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: safe


def yaml_scalar(value: Any) -> str:
    """A value as its one-line YAML text, which ``-S key=value`` accepts back."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


@dataclass(frozen=True)
class PromoteConfig(Section):
    """The promotion gate: whether it acts, and how sure it must be (flows.promotion)."""

    SECTION: ClassVar[str] = "promote"
    mode: str = setting("enabled", one_of(*GATE_MODES))
    floor_nll: float = setting(250.0, number())
    margin_nats: float = setting(0.1, number(0.0))
    bootstrap_samples: int = setting(2000, integer(1))
    confidence: float = setting(0.95, number(0.0, 1.0, low_open=True, high_open=True))


@dataclass(frozen=True)
class DriftConfig(Section):
    """When a scored batch no longer looks like the champion's holdout (flows.drift): drift if
    the two-sample test rejects at `alpha` and the mean NLL rose by more than
    `min_mean_shift_nats` (the bootstrap interval's lower end), or if more than
    `max_tail_share` of the batch lies beyond the holdout's 99th percentile."""

    SECTION: ClassVar[str] = "drift"
    alpha: float = setting(0.01, number(0.0, 1.0, low_open=True, high_open=True))
    min_mean_shift_nats: float = setting(2.0, number(0.0))
    max_tail_share: float = setting(0.05, number(0.0, 1.0, high_open=True))
    bootstrap_samples: int = setting(2000, integer(1))
    confidence: float = setting(0.95, number(0.0, 1.0, low_open=True, high_open=True))


@dataclass(frozen=True)
class LimitsConfig(Section):
    """Time limits of a training flow run and of its long tasks, in minutes (0 = none). A run
    past one ends TimedOut, puts params.yaml and dvc.lock back, releases the workspace and
    marks its MLflow run FAILED, so a run that hangs while alive cannot hold the deployment's
    one slot for ever: the next scheduled run goes through."""

    SECTION: ClassVar[str] = "limits"
    flow_minutes: float = setting(720.0, number(0.0))
    train_minutes: float = setting(600.0, number(0.0))
    evaluate_minutes: float = setting(120.0, number(0.0))

    @staticmethod
    def seconds(minutes: float) -> float | None:
        """A limit as Prefect's timeout_seconds: None for no limit."""
        return 60.0 * minutes if minutes > 0 else None


#: Sections that change when a run acts, not what it trains: left out of `Params.hash`.
OPERATIONAL_SECTIONS = ("drift", "limits")


@dataclass(frozen=True)
class Params:
    """The whole of params.yaml, one attribute per section."""

    data: DataConfig
    fetch: FetchConfig
    model: VAEConfig
    train: TrainConfig
    evaluate: EvalConfig
    classifier: ClassifierTrainConfig
    promote: PromoteConfig
    drift: DriftConfig
    limits: LimitsConfig

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: getattr(self, name).to_dict() for name in SECTIONS}

    def flat(self) -> dict[str, str]:
        """Dotted keys with YAML-text values (``{"train.lr": "0.001"}``), as MLflow params
        want; each ``key=value`` can be fed back as an override."""
        return {
            f"{section}.{key}": yaml_scalar(value)
            for section, values in self.to_dict().items()
            for key, value in values.items()
        }

    def hash(self) -> str:
        """A short digest of every value that shapes a model (the drift and limits sections
        only say when to act and how long to wait): equal parameters, equal hash."""
        shaping = {k: v for k, v in self.to_dict().items() if k not in OPERATIONAL_SECTIONS}
        canonical = json.dumps(shaping, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    def replace(self, overrides: Iterable[str] | Mapping[str, Any]) -> Params:
        """A copy with overrides applied and checked (a sweep's trial, say)."""
        return build_params(_apply(self.to_dict(), _normalize(overrides)))


#: Section name -> its dataclass, in params.yaml's order.
SECTIONS: dict[str, type[Section]] = typing.get_type_hints(Params)
KNOWN_KEYS: tuple[str, ...] = tuple(f"{s}.{k}" for s, cls in SECTIONS.items() for k in cls.names())


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.5)
    if not close:  # a bare sub-key ("epochs") or a wrong section: match on the last part
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in KNOWN_KEYS if k.endswith("." + tail)][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_known(key: str, origin: str) -> str:
    if key not in KNOWN_KEYS:
        raise ParamsError(f"{origin}: unknown parameter {key!r}{_suggest(key)}")
    return key


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` and parse the value as YAML (so ``3`` is an int, ``true`` a
    bool, ``[400, 200]`` a list), exactly as ``dvc exp run -S`` does."""
    if not isinstance(text, str) or "=" not in text:
        raise ParamsError(f"override {text!r}: expected the form key.sub=value")
    key, raw = text.split("=", 1)
    key = _check_known(key.strip(), f"override {text!r}")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key, value


def _normalize(overrides: Iterable[str] | Mapping[str, Any]) -> list[tuple[str, Any]]:
    """``key=value`` strings, or a mapping (dotted keys, or nested by section), as pairs."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, Mapping):
        return [parse_override(o) for o in overrides]
    pairs: list[tuple[str, Any]] = []
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            pairs += [(f"{key}.{sub}", v) for sub, v in value.items()]
        else:
            pairs.append((key, value))
    return [(_check_known(key, "override"), value) for key, value in pairs]


def _apply(raw: dict[str, Any], pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    for key, value in pairs:
        section, sub = key.split(".", 1)
        if not isinstance(raw.get(section), dict):
            raise ParamsError(f"override {key!r}: section {section!r} is missing from params")
        raw[section][sub] = value
    return raw


def build_params(raw: Any) -> Params:
    """The typed tree from plain data: every section and key present and known, every value
    allowed; ``ParamsError`` names the key, the value and what is allowed."""
    if not isinstance(raw, Mapping):
        raise ParamsError(f"params: expected a mapping of sections, found {type(raw).__name__}")
    for section, values in raw.items():
        if section not in SECTIONS:
            raise ParamsError(f"params: unknown section {section!r}{_suggest(str(section))}")
        if not isinstance(values, Mapping):
            raise ParamsError(
                f"params: section {section!r} must be a mapping of keys, found {values!r}"
            )
        for key in values:
            _check_known(f"{section}.{key}", "params")
    sections = {}
    for section, cls in SECTIONS.items():
        if section not in raw:
            raise ParamsError(f"params: missing section {section!r}")
        missing = [k for k in cls.names() if k not in raw[section]]
        if missing:
            raise ParamsError(f"params: missing key '{section}.{missing[0]}'")
        try:
            sections[section] = cls(**raw[section])
        except ConfigError as exc:
            raise ParamsError(str(exc)) from None
    return Params(**sections)


def _read_text(path: Path, what: str, error: type[VaeError]) -> str:
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise error(f"{path}: not valid YAML ({exc})") from exc


def _yaml_mapping(text: str, path: Path, what: str, error: type[VaeError]) -> dict[str, Any]:
    try:
        data = yaml_load(text)
    except yaml.YAMLError as exc:
        raise error(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise error(f"{path}: expected {what} as a mapping, found {type(data).__name__}")
    return data


def read_yaml_mapping(path: Path, what: str, error: type[VaeError] = ParamsError) -> dict[str, Any]:
    """A YAML file (read as params.yaml is) that must hold a mapping; ``error`` says which file
    and what is wrong with it."""
    return _yaml_mapping(_read_text(path, what, error), path, what, error)


def _check_val_size_fits(params: Params) -> None:
    """Refuse a ``data.val_size`` + ``data.holdout_size`` that leaves no training image when
    the source's size is
    known without fetching (named sources, a folder's IDX header); prepare checks the real
    count again."""
    from vae_core.data.sources import train_count_hint

    data = params.data
    n = train_count_hint(data.source, data.dataset)
    if n is not None and data.val_size + data.holdout_size > n - 1:
        raise ParamsError(
            f"data.val_size = {data.val_size!r} and data.holdout_size = {data.holdout_size!r} "
            f"do not fit the training set of {n} images of data.source = {data.source!r}: "
            f"expected val_size + holdout_size from 2 to {n - 1} (at least one image must "
            "remain for training)"
        )


def load_params(
    path: str | os.PathLike[str] = DEFAULT_PATH,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> Params:
    """Read params.yaml, apply overrides in memory, check everything, return the tree."""
    params = _read(Path(path), _normalize(overrides))
    try:
        _check_val_size_fits(params)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None
    return params


#: (file, its text, the overrides) -> the checked tree: see `_read`.
_PARSED: dict[tuple[str, str, str], Params] = {}
_PARSED_MAX = 8


def _read(path: Path, pairs: list[tuple[str, Any]]) -> Params:
    """The checked tree of ``path`` with ``pairs`` applied, parsed once per content.

    One `vae-pipeline run` reads params.yaml several times (the command's early check before
    Prefect starts, the flow's check before it waits for the workspace, the read under the
    lock), and each must see the file as it is then; the same bytes with the same overrides
    give the same frozen tree, so only a file that changed meanwhile is parsed again."""
    text = _read_text(path, "parameters file", ParamsError)
    key = (str(path.resolve()), text, json.dumps(pairs, sort_keys=True, default=repr))
    if key not in _PARSED:
        raw = _yaml_mapping(text, path, "parameters file", ParamsError)
        try:
            params = build_params(_apply(raw, pairs))
        except ParamsError as exc:
            raise ParamsError(f"{path}: {exc}") from None
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        _PARSED[key] = params
    return _PARSED[key]


def write_params(
    path: str | os.PathLike[str], overrides: Iterable[str] | Mapping[str, Any]
) -> Params:
    """Apply overrides to the params file itself, keeping its comments and layout, atomically.

    The result is checked before anything is written, so a bad value never reaches the file.
    """
    from ruamel.yaml import YAML  # round-trip loader that keeps comments (dvc depends on it)
    from ruamel.yaml.comments import CommentedSeq

    path = Path(path)
    pairs = _normalize(overrides)
    params = _read(path, pairs)  # every value checked before the file is touched
    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text(encoding="utf-8"))
    for key, value in pairs:
        section, sub = key.split(".", 1)
        if isinstance(value, list | tuple):  # keep lists inline, as [400] is written
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        doc[section][sub] = value
        _align_comment(doc[section], sub)
    buf = io.StringIO()
    rt.dump(doc, buf)
    atomic_write_text(path, buf.getvalue())
    return params


def _align_comment(mapping: Any, key: str) -> None:
    """Put ``key``'s end-of-line comment back in the section's usual column, so setting a long
    value and then the old one again gives back the file byte for byte."""
    items = getattr(getattr(mapping, "ca", None), "items", {})
    own = items.get(key)
    if not own or len(own) < 3 or own[2] is None:
        return
    columns = [
        t[2].column for k, t in items.items() if k != key and t and len(t) > 2 and t[2] is not None
    ]
    if columns:
        own[2].column = max(set(columns), key=columns.count)


def add_override_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The `-S key=value` option, repeatable, shared by every command that takes overrides."""
    parser.add_argument(
        "-S",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )
