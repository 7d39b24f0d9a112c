"""Every setting of the library, one frozen dataclass per params.yaml section, checked once.

Each field declares its default and its rule (``setting(10, integer(0))``); constructing a
section checks every rule and raises ``ConfigError`` with the key, the value found and what is
allowed. That is the only place a range or an enum is written down: the code that uses a
setting trusts it. The enums (datasets, sources, architectures, likelihoods, data variants)
live here because the library is what gives them meaning; the modules that implement them
check at import that they cover exactly these names.

Standard library only, so the command line can refuse a bad value before importing torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from vae_core.errors import VaeError

DATASETS = ("mnist", "fashion-mnist", "kmnist")
NAMED_SOURCES = ("embedded", "download")
ARCHITECTURES = ("mlp", "conv", "mlp2")  # mlp2: two stochastic layers (Burda et al. 2015)
ACTIVATIONS = ("relu", "tanh")
OBJECTIVES = ("elbo", "iwae")
LR_SCHEDULES = ("constant", "exponential", "burda")
LIKELIHOODS = ("bernoulli", "continuous_bernoulli")
DATA_VARIANTS = ("binarized", "continuous")
# fp32 | bf16 matrix products | auto: bf16 where the hardware has fast bf16 matrix units (and,
# in CPU training, at a batch large enough for them to pay): vae_core.training.precision
PRECISIONS = ("fp32", "bf16", "auto")
RECIPES = ("fixed", "budget")  # vae_core.training.recipe


class ConfigError(VaeError, ValueError):
    """A setting is missing, unknown, or has a value outside what is allowed."""


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """A check and the phrase that says what it allows ("an integer >= 1")."""

    allows: Callable[[Any], bool]
    allowed: str
    hint: Callable[[Any], str] | None = None  # extra words about a refused value, if any

    def problem(self, value: Any) -> str | None:
        if self.allows(value):
            return None
        extra = self.hint(value) if self.hint else ""
        return self.allowed + (f" ({extra})" if extra else "")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int) -> Rule:
    return Rule(lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}")


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> Rule:
    """A finite real number, optionally within bounds (``low_open``: the bound is excluded)."""
    if low is not None and high is not None:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        text = "a finite number"

    def allows(v: Any) -> bool:
        if not _is_real(v):
            return False
        if low is not None and (v <= low if low_open else v < low):
            return False
        return not (high is not None and (v >= high if high_open else v > high))

    return Rule(allows, text)


def one_of(*choices: str) -> Rule:
    return Rule(lambda v: isinstance(v, str) and v in choices, f"one of {', '.join(choices)}")


BOOLEAN = Rule(lambda v: isinstance(v, bool), "true or false")
POSITIVE_INTS = Rule(
    lambda v: isinstance(v, list | tuple) and bool(v) and all(_is_int(x) and x >= 1 for x in v),
    "a non-empty list of integers >= 1, e.g. [400]",
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_DEVICE = re.compile(r"^(auto|cpu|cuda|mps|cuda:\d+)$")


def _source_hint(v: Any) -> str:
    if not isinstance(v, str):
        return ""
    if _URL.match(v):
        return "a URL is not a source: download the files into a folder"
    close = difflib.get_close_matches(v.lower(), NAMED_SOURCES, n=1, cutoff=0.6)
    return f"{v!r} is no folder here and looks like {close[0]!r} misspelled" if close else ""


def _source_ok(v: Any) -> bool:
    if not (isinstance(v, str) and v.strip()):
        return False
    if v in NAMED_SOURCES or os.path.isdir(v):
        return True
    # Any other path is accepted here (the fetch stage says whether the folder holds the
    # files); a URL or a near-miss of a named source is refused as a probable mistake.
    return not _URL.match(v) and not ("/" not in v and os.sep not in v and _source_hint(v))


SOURCE = Rule(
    _source_ok, "'embedded', 'download', or a folder path holding the four IDX files", _source_hint
)
DEVICE = Rule(
    lambda v: isinstance(v, str) and bool(_DEVICE.match(v)), "auto, cpu, cuda, mps or cuda:N"
)


def setting(default: Any, rule: Rule) -> Any:
    """A dataclass field that carries the rule its values must follow."""
    return dataclasses.field(default=default, metadata={"rule": rule})


# --------------------------------------------------------------------------- sections

S = TypeVar("S", bound="Section")


class Section:
    """Base of the section dataclasses: checks every field's rule on construction."""

    SECTION: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rule: Rule | None = f.metadata.get("rule")
            problem = rule.problem(value) if rule else None
            if problem is not None:
                raise ConfigError(
                    f"{self.SECTION}.{f.name} = {value!r} is not allowed: expected {problem}"
                )
            if isinstance(value, list):  # frozen means frozen: lists become tuples
                object.__setattr__(self, f.name, tuple(value))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls: type[S], values: Mapping[str, Any]) -> S:
        """Build from a mapping, ignoring keys this section does not have (a saved model's
        config carries a few more); flows.params refuses unknown keys in params.yaml."""
        known = set(cls.names())
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        """Plain data (tuples as lists), as params.yaml and JSON write it."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }


@dataclass(frozen=True)
class DataConfig(Section):
    """Which data, and how the prepare stage splits it."""

    SECTION: ClassVar[str] = "data"
    dataset: str = setting("mnist", one_of(*DATASETS))
    source: str = setting("embedded", SOURCE)
    val_size: int = setting(500, integer(1))
    holdout_size: int = setting(500, integer(1))
    split_seed: int = setting(0, integer(0))
    binarize_seed: int = setting(0, integer(0))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.source == "embedded" and self.dataset != "mnist":
            raise ConfigError(
                f"data.source = 'embedded' holds MNIST digits only, but data.dataset = "
                f"{self.dataset!r}: expected data.dataset 'mnist', or data.source 'download' "
                "or a folder"
            )


@dataclass(frozen=True)
class FetchConfig(Section):
    """How often the orchestrator retries the fetch stage after a source could not be reached
    (Prefect task retries, the one retry layer: the stage itself tries once)."""

    SECTION: ClassVar[str] = "fetch"
    retries: int = setting(3, integer(0))
    backoff_s: float = setting(1.0, number(0.0))


@dataclass(frozen=True)
class VAEConfig(Section):
    """Everything needed to rebuild the network; saved beside every set of weights."""

    SECTION: ClassVar[str] = "model"
    architecture: str = setting("mlp", one_of(*ARCHITECTURES))
    hidden_sizes: tuple[int, ...] = setting((400,), POSITIVE_INTS)
    latent_dim: int = setting(20, integer(1))  # mlp2: the first stochastic layer, z1
    likelihood: str = setting("bernoulli", one_of(*LIKELIHOODS))
    activation: str = setting("relu", one_of(*ACTIVATIONS))  # of the MLP hidden layers
    # mlp2 only: the second stochastic layer z2 and the hidden layers between z1 and z2
    top_hidden_sizes: tuple[int, ...] = setting((100, 100), POSITIVE_INTS)
    top_latent_dim: int = setting(50, integer(1))


#: Burda et al. (2015)'s networks: one stochastic layer (two deterministic layers of 200 tanh
#: units, 50 latent units) and two (784-200-200-100 then 100-100-50, mirrored).
BURDA_ONE_LAYER = VAEConfig(hidden_sizes=(200, 200), latent_dim=50, activation="tanh")
BURDA_TWO_LAYER = VAEConfig(
    architecture="mlp2",
    hidden_sizes=(200, 200),
    latent_dim=100,
    activation="tanh",
    top_hidden_sizes=(100, 100),
    top_latent_dim=50,
)


@dataclass(frozen=True)
class TrainConfig(Section):
    """How to train; the model's shape lives in VAEConfig, kept apart on purpose."""

    SECTION: ClassVar[str] = "train"
    # binarized: resampled every epoch; continuous: grey levels in [0, 1]
    data_variant: str = setting("binarized", one_of(*DATA_VARIANTS))
    epochs: int = setting(300, integer(0))  # 0 trains nothing: a baseline for the gate
    batch_size: int = setting(128, integer(1))
    lr: float = setting(2e-3, number(0.0, 1.0, low_open=True))
    # constant | exponential (lr to lr * lr_final over the epochs) | burda (lr * 10^(-i/7)
    # for 3^i epochs, i = 0..7: Burda et al. 2015, 3,280 epochs in all)
    lr_schedule: str = setting("exponential", one_of(*LR_SCHEDULES))
    lr_final: float = setting(0.1, number(0.0, 1.0, low_open=True))  # exponential only
    # elbo (analytic KL where it exists) | iwae (the importance-weighted bound, iwae_k samples)
    objective: str = setting("elbo", one_of(*OBJECTIVES))
    iwae_k: int = setting(1, integer(1))  # samples per image of the iwae objective
    beta: float = setting(1.0, number(0.0))
    warmup_epochs: int = setting(0, integer(0))
    patience: int = setting(20, integer(0))  # epochs without a better val -ELBO; 0 = never stop
    # stop after the epoch that passes this many minutes of training (0 = no limit): a time
    # budget makes the number of epochs depend on the machine, so the default has none
    max_minutes: float = setting(0.0, number(0.0))
    seed: int = setting(0, integer(0))
    device: str = setting("auto", DEVICE)
    compile: bool = setting(False, BOOLEAN)
    # write the resume checkpoint at most this often, in seconds of training (0 = after every
    # epoch; the last epoch is always written): a GPU epoch of the MLP is well under a second
    checkpoint_every_s: float = setting(0.0, number(0.0))
    # the matrix products' precision: fp32 | bf16 | auto (bf16 on CUDA with bf16 tensor cores,
    # and on a CPU with AMX at batch_size >= 512, where it pays; fp32 elsewhere)
    matmul_precision: str = setting("auto", one_of(*PRECISIONS))
    # fixed: batch_size, lr and matmul_precision as set | budget (needs max_minutes): the batch,
    # precision and lr scaled from `lr` that train best in that time on this hardware
    recipe: str = setting("fixed", one_of(*RECIPES))


@dataclass(frozen=True)
class EvalConfig(Section):
    """How the trained model is scored."""

    SECTION: ClassVar[str] = "evaluate"
    iwae_k: int = setting(100, integer(1))
    iwae_test_size: int = setting(1000, integer(0))  # 0 = the whole test set
    num_samples: int = setting(1000, integer(1))
    seed: int = setting(0, integer(0))
    # the IWAE estimator's matrix products: fp32 | bf16 | auto (bf16 on AMX or bf16 tensor
    # cores); the log-probabilities, log-weights and log-sum-exp stay float32/float64. bf16
    # moved the mean NLL of an MLP VAE by 0.0007 +- 0.0007 nats (k=5000, 1,000 MNIST test images)
    matmul_precision: str = setting("auto", one_of(*PRECISIONS))


@dataclass(frozen=True)
class ClassifierTrainConfig(Section):
    """How the in-house feature classifier (versioned like data) is trained."""

    SECTION: ClassVar[str] = "classifier"
    epochs: int = setting(5, integer(1))
    batch_size: int = setting(128, integer(1))
    lr: float = setting(0.002, number(0.0, 1.0, low_open=True))
    seed: int = setting(0, integer(0))
