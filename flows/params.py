"""params.yaml: load it, apply ``key.sub=value`` overrides, validate every key, write it back.

params.yaml is the single source of truth for the DVC stages and the Prefect flow. Overrides
work like ``dvc exp run -S key=value``: the value is parsed as YAML, the key must already exist
(a typo is refused with the nearest known key), and ``write_params`` applies overrides to the
file itself, keeping its comments, so the DVC stages see the same values a run records.
"""

from __future__ import annotations

import argparse
import difflib
import io
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PATH = "params.yaml"


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


class ParamsError(ValueError):
    """A parameter is missing, unknown, or has a value outside what is allowed."""


# --------------------------------------------------------------------------- validators
# Each validator returns None when the value is fine, else a phrase saying what is allowed.

Validator = Callable[[Any], str | None]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


def int_min(minimum: int) -> Validator:
    def check(v: Any) -> str | None:
        return None if _is_int(v) and v >= minimum else f"an integer >= {minimum}"

    return check


def real_range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Validator:
    lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
    hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
    if low is not None and high is not None:
        text = f"a number in {lo}, {hi}"
    elif low is not None:
        text = f"a number {'>' if low_open else '>='} {low:g}"
    elif high is not None:
        text = f"a number {'<' if high_open else '<='} {high:g}"
    else:
        text = "a finite number"

    def check(v: Any) -> str | None:
        if not _is_real(v):
            return text
        if low is not None and (v <= low if low_open else v < low):
            return text
        if high is not None and (v >= high if high_open else v > high):
            return text
        return None

    return check


def one_of(*choices: str) -> Validator:
    def check(v: Any) -> str | None:
        return None if isinstance(v, str) and v in choices else f"one of {', '.join(choices)}"

    return check


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "true or false"


def positive_int_list(v: Any) -> str | None:
    ok = isinstance(v, list) and v and all(_is_int(x) and x >= 1 for x in v)
    return None if ok else "a non-empty list of integers >= 1, e.g. [400]"


NAMED_SOURCES = ("embedded", "download")
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def source_value(v: Any) -> str | None:
    allowed = "'embedded', 'download', or a folder path holding the four IDX files"
    if not (isinstance(v, str) and v.strip()):
        return allowed
    if v in NAMED_SOURCES or os.path.isdir(v):
        return None
    if _URL.match(v):
        return f"{allowed} (a URL is not a source: download the files into a folder)"
    if os.sep not in v and "/" not in v:
        close = difflib.get_close_matches(v.lower(), NAMED_SOURCES, n=1, cutoff=0.6)
        if close:
            return f"{allowed} ({v!r} is no folder here and looks like {close[0]!r} misspelled)"
    return None


_DEVICE = re.compile(r"^(auto|cpu|cuda|mps|cuda:\d+)$")


def device_value(v: Any) -> str | None:
    ok = isinstance(v, str) and _DEVICE.match(v)
    return None if ok else "auto, cpu, cuda, mps or cuda:N"


DATASETS = ("mnist", "fashion-mnist", "kmnist")

#: Every known key, by section, with its validator. Adding a key to params.yaml means adding
#: it here; anything else is refused as a probable typo.
SCHEMA: dict[str, dict[str, Validator]] = {
    "data": {
        "dataset": one_of(*DATASETS),
        "source": source_value,
        "val_size": int_min(1),
        "split_seed": int_min(0),
        "binarize_seed": int_min(0),
    },
    "fetch": {
        "retries": int_min(0),
        "backoff_s": real_range(0.0),
    },
    "model": {
        "architecture": one_of("mlp", "conv"),
        "hidden_sizes": positive_int_list,
        "latent_dim": int_min(1),
        "likelihood": one_of("bernoulli", "continuous_bernoulli"),
    },
    "train": {
        "data_variant": one_of("binarized", "continuous"),
        "epochs": int_min(0),  # 0 trains nothing: a deliberate baseline for the promotion gate
        "batch_size": int_min(1),
        "lr": real_range(0.0, 1.0, low_open=True),
        "beta": real_range(0.0),
        "warmup_epochs": int_min(0),
        "patience": int_min(0),  # 0 = no early stopping
        "seed": int_min(0),
        "device": device_value,
        "compile": boolean,
    },
    "evaluate": {
        "iwae_k": int_min(1),
        "iwae_test_size": int_min(0),  # 0 means the whole test set
        "num_samples": int_min(1),
        "seed": int_min(0),
    },
    "classifier": {
        "epochs": int_min(1),
        "batch_size": int_min(1),
        "lr": real_range(0.0, 1.0, low_open=True),
        "seed": int_min(0),
    },
    "promote": {
        "mode": one_of("disabled", "dry-run", "enabled"),
        "floor_nll": real_range(),
        "margin_nats": real_range(0.0),
        "bootstrap_samples": int_min(1),
        "confidence": real_range(0.0, 1.0, low_open=True, high_open=True),
    },
}

KNOWN_KEYS: tuple[str, ...] = tuple(f"{s}.{k}" for s, keys in SCHEMA.items() for k in keys)


# --------------------------------------------------------------------------- helpers


def _suggest(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN_KEYS, n=1, cutoff=0.5)
    if not close:
        # a bare sub-key ("epochs") or a wrong section: match on the last part
        tail = key.rsplit(".", 1)[-1]
        close = [k for k in KNOWN_KEYS if k.endswith("." + tail)][:1]
    return f"; did you mean {close[0]!r}?" if close else ""


def _check_known(key: str, origin: str) -> tuple[str, str]:
    if key not in KNOWN_KEYS:
        raise ParamsError(f"{origin}: unknown parameter {key!r}{_suggest(key)}")
    section, sub = key.split(".", 1)
    return section, sub


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``key.sub=value`` and parse the value as YAML (so ``3`` is an int, ``true`` a
    bool, ``[400, 200]`` a list), exactly as ``dvc exp run -S`` does."""
    if not isinstance(text, str) or "=" not in text:
        raise ParamsError(f"override {text!r}: expected the form key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    _check_known(key, f"override {text!r}")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({exc})") from exc
    return key, value


def _normalize_overrides(
    overrides: Iterable[str] | Mapping[str, Any],
) -> list[tuple[str, Any]]:
    if isinstance(overrides, Mapping):
        flat: list[tuple[str, Any]] = []
        for key, value in overrides.items():
            if isinstance(value, Mapping):  # nested {"data": {"val_size": 5}}
                for sub, v in value.items():
                    flat.append((f"{key}.{sub}", v))
            else:
                flat.append((key, value))
        for key, _ in flat:
            _check_known(key, "override")
        return flat
    if isinstance(overrides, str):
        overrides = [overrides]
    return [parse_override(o) for o in overrides]


def apply_overrides(
    params: dict[str, Any], overrides: Iterable[str] | Mapping[str, Any]
) -> dict[str, Any]:
    """Set each overridden key in ``params`` (in place) and return it."""
    for key, value in _normalize_overrides(overrides):
        section, sub = key.split(".", 1)
        if not isinstance(params.get(section), dict):
            raise ParamsError(f"override {key!r}: section {section!r} is missing from params")
        params[section][sub] = value
    return params


# --------------------------------------------------------------------------- public API


def validate_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """Check every section and key: no unknown or missing key, every value of an allowed
    type and range; raise ``ParamsError`` naming the key, the value and what is allowed."""
    if not isinstance(params, Mapping):
        raise ParamsError(f"params: expected a mapping of sections, found {type(params).__name__}")
    for section, value in params.items():
        if section not in SCHEMA:
            raise ParamsError(f"params: unknown section {section!r}{_suggest(str(section))}")
        if not isinstance(value, Mapping):
            raise ParamsError(
                f"params: section {section!r} must be a mapping of keys, found {value!r}"
            )
        for key in value:
            _check_known(f"{section}.{key}", "params")
    for section, keys in SCHEMA.items():
        if section not in params:
            raise ParamsError(f"params: missing section {section!r}")
        for key, check in keys.items():
            if key not in params[section]:
                raise ParamsError(f"params: missing key '{section}.{key}'")
            value = params[section][key]
            allowed = check(value)
            if allowed is not None:
                raise ParamsError(f"{section}.{key} = {value!r} is not allowed: expected {allowed}")
    if params["data"]["source"] == "embedded" and params["data"]["dataset"] != "mnist":
        raise ParamsError(
            f"data.source = 'embedded' holds MNIST digits only, but data.dataset = "
            f"{params['data']['dataset']!r}: expected data.dataset 'mnist', or data.source "
            "'download' or a folder"
        )
    return dict(params)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path}: parameters file not found")
    try:
        data = yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, found {type(data).__name__}")
    return data


def load_params(
    path: str | os.PathLike[str] = DEFAULT_PATH,
    overrides: Iterable[str] | Mapping[str, Any] = (),
) -> dict[str, Any]:
    """Read params.yaml, apply overrides (``key.sub=value``) in memory, validate, return."""
    params = _read_yaml(Path(path))
    try:
        apply_overrides(params, overrides)
        checked = validate_params(params)
        check_val_size_fits(checked)
        return checked
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def check_val_size_fits(params: Mapping[str, Any]) -> None:
    """Refuse a ``data.val_size`` that leaves no training image, when the size of the source's
    training set is known without fetching (named sources, or a folder's IDX header); the
    prepare stage checks the real count again."""
    from vae_core.data.sources import train_count_hint

    data = params["data"]
    n = train_count_hint(data["source"], data["dataset"])
    if n is not None and data["val_size"] > n - 1:
        raise ParamsError(
            f"data.val_size = {data['val_size']!r} does not fit the training set of {n} images "
            f"of data.source = {data['source']!r}: expected an integer from 1 to {n - 1} (at "
            "least one image must remain for training)"
        )


def write_params(
    path: str | os.PathLike[str],
    params_or_overrides: Iterable[str] | Mapping[str, Any],
) -> dict[str, Any]:
    """Apply overrides to the params file itself, keeping its comments and layout, atomically.

    Accepts ``key.sub=value`` strings or a mapping (nested by section, or dotted keys). The
    result is validated before anything is written, so a bad value never reaches the file.
    Returns the new parameters as plain data.
    """
    from ruamel.yaml import YAML  # round-trip loader that keeps comments (dvc depends on it)
    from ruamel.yaml.comments import CommentedSeq

    path = Path(path)
    overrides = _normalize_overrides(params_or_overrides)
    plain = _read_yaml(path)
    apply_overrides(plain, dict(overrides))
    try:
        validate_params(plain)
    except ParamsError as exc:
        raise ParamsError(f"{path}: {exc}") from None

    rt = YAML()
    rt.preserve_quotes = True
    doc = rt.load(path.read_text(encoding="utf-8"))
    for key, value in overrides:
        section, sub = key.split(".", 1)
        if isinstance(value, list):  # keep lists inline, as [400] is written in the file
            value = CommentedSeq(value)
            value.fa.set_flow_style()
        doc[section][sub] = value
        _align_comment(doc[section], sub)
    buf = io.StringIO()
    rt.dump(doc, buf)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return plain


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


def _scalar(value: Any) -> str:
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted keys with string values (``{"train.lr": "0.001"}``), as MLflow params want;
    each value is written as YAML, so ``key=value`` can be fed back as an override."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = _scalar(value)
    return out


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
