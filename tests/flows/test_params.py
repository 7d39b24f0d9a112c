"""params.yaml: defaults, overrides, validation of every key, comment-preserving writes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT

from flows.params import (
    KNOWN_KEYS,
    SECTIONS,
    Params,
    ParamsError,
    build_params,
    load_params,
    parse_override,
    write_params,
)

#: The documented defaults (params.yaml as committed), section by section.
EXPECTED = yaml.safe_load("""
data: {dataset: mnist, source: embedded, val_size: 500, holdout_size: 500, split_seed: 0,
  binarize_seed: 0}
fetch: {retries: 3, backoff_s: 1.0}
model: {architecture: mlp, hidden_sizes: [400], latent_dim: 20, likelihood: bernoulli,
  activation: relu, top_hidden_sizes: [100, 100], top_latent_dim: 50}
train: {data_variant: binarized, epochs: 300, batch_size: 128, lr: 0.002, lr_schedule:
  exponential, lr_final: 0.1, objective: elbo, iwae_k: 1, beta: 1.0, warmup_epochs: 0,
  patience: 20, max_minutes: 0.0, seed: 0, device: auto, compile: false,
  checkpoint_every_s: 0.0, matmul_precision: auto, recipe: fixed}
evaluate: {iwae_k: 100, iwae_test_size: 1000, num_samples: 1000, seed: 0,
  matmul_precision: auto}
classifier: {epochs: 5, batch_size: 128, lr: 0.002, seed: 0}
promote: {mode: enabled, floor_nll: 250.0, margin_nats: 0.1, bootstrap_samples: 2000,
  confidence: 0.95}
drift: {alpha: 0.01, min_mean_shift_nats: 2.0, max_tail_share: 0.05, bootstrap_samples: 2000,
  confidence: 0.95}
limits: {flow_minutes: 720.0, train_minutes: 600.0, evaluate_minutes: 120.0}
""")


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    return Path(shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml"))


def test_repo_params_are_the_documented_defaults_commented_typed_and_frozen() -> None:
    params = load_params(REPO_ROOT / "params.yaml")
    assert isinstance(params, Params) and params.to_dict() == EXPECTED
    assert list(SECTIONS) == list(EXPECTED)
    names = {s: set(cls.names()) for s, cls in SECTIONS.items()}
    assert names == {s: set(k) for s, k in EXPECTED.items()}
    # The dataclass defaults are the documented defaults too: one place for both.
    assert {s: cls().to_dict() for s, cls in SECTIONS.items()} == EXPECTED
    assert build_params(EXPECTED).to_dict() == EXPECTED  # plain data round-trips
    assert params.train.epochs == 300 and params.evaluate.iwae_k == 100
    assert params.model.hidden_sizes == (400,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 3  # type: ignore[misc]
    for line in (REPO_ROOT / "params.yaml").read_text().splitlines():
        if line.startswith("  ") and ":" in line:
            assert "#" in line, f"no comment on: {line!r}"


def test_overrides_are_parsed_as_yaml(params_file: Path) -> None:
    overrides = "train.epochs=3|train.lr=1e-3|train.compile=true|model.hidden_sizes=[512, 256]"
    p = load_params(params_file, [*overrides.split("|"), "data.source=/data/mnist folder"])
    assert (p.train.epochs, p.train.compile, p.model.hidden_sizes) == (3, True, (512, 256))
    assert p.train.lr == pytest.approx(0.001)  # YAML 1.2 float, as DVC reads it
    assert p.data.source == "/data/mnist folder"
    assert load_params(params_file, ["train.device=cuda:1"]).train.device == "cuda:1"
    assert yaml.safe_load(params_file.read_text())["train"]["epochs"] == 300  # file untouched


TYPOS = {"data.splt_seed=1": "data.split_seed", "train.epoch=1": "train.epochs"}
TYPOS |= {"evaluate.iwae=5": "evaluate.iwae_k", "trian.lr=0.1": "train.lr"}


@pytest.mark.parametrize(("override", "suggestion"), TYPOS.items())
def test_unknown_key_is_refused_with_a_suggestion(params_file: Path, override, suggestion):
    key = override.split("=")[0]
    with pytest.raises(
        ParamsError, match=rf"unknown parameter '{key}'; did you mean '{suggestion}'"
    ):
        load_params(params_file, [override])
    with pytest.raises(ParamsError, match="expected the form key.sub=value"):
        parse_override(key)


#: Each refusal's "expected ..." and the bad values (overrides) that get it.
BAD_VALUES = {
    "one of mnist, fashion-mnist, kmnist": "data.dataset=cifar10",
    "'embedded', 'download', or a folder path": "data.source=''",
    "an integer >= 1": "data.val_size=0 model.latent_dim=0 train.batch_size=12.0 "
    "evaluate.iwae_k=0 evaluate.num_samples=0 classifier.epochs=0 promote.bootstrap_samples=0",
    "an integer >= 0": "data.split_seed=-1 data.binarize_seed=1.5 fetch.retries=-1 train.epochs=-1 "
    "train.epochs=true train.warmup_epochs=-1 train.patience=-2 train.seed=x "
    "evaluate.iwae_test_size=-1",
    "a number >= 0": "fetch.backoff_s=-0.5 train.beta=-1 promote.margin_nats=-0.1",
    "one of mlp, conv": "model.architecture=resnet",
    "a non-empty list of integers >= 1": "model.hidden_sizes=400 model.hidden_sizes=[] "
    "model.hidden_sizes=[400,0]",
    "one of bernoulli, continuous_bernoulli": "model.likelihood=gaussian",
    "one of binarized, continuous": "train.data_variant=grey",
    r"a number in \(0, 1\]": "train.lr=0 train.lr=1.5 train.lr=.nan classifier.lr=2",
    "auto, cpu, cuda, mps or cuda:N": "train.device=gpu train.device=cuda:",
    "true or false": "train.compile=1",
    "one of disabled, dry-run, enabled": "promote.mode=on",
    "a finite number": "promote.floor_nll=.inf",
    r"a number in \(0, 1\)": "promote.confidence=1.0",
}


@pytest.mark.parametrize(
    ("override", "allowed"), [(o, a) for a, bad in BAD_VALUES.items() for o in bad.split()]
)
def test_bad_values_name_key_value_and_what_is_allowed(
    params_file: Path, override: str, allowed: str
) -> None:
    key = override.split("=")[0]
    with pytest.raises(ParamsError, match=rf"{key} = .* is not allowed: expected {allowed}"):
        load_params(params_file, [override])


def test_good_edge_values_pass(params_file: Path) -> None:
    edges = {"train.lr": 1, "train.beta": 0, "evaluate.iwae_test_size": 0, "evaluate.iwae_k": 1}
    edges |= {"promote.mode": "dry-run", "model.likelihood": "continuous_bernoulli"}
    edges |= {"train.device": "mps", "data.dataset": "kmnist", "data.source": "download"}
    p = load_params(params_file, [f"{k}={v}" for k, v in edges.items()])
    assert {k: getattr(getattr(p, k.split(".")[0]), k.split(".")[1]) for k in edges} == edges


def test_file_level_problems_and_a_source_that_cannot_hold_the_dataset(
    tmp_path: Path, params_file: Path
) -> None:
    with pytest.raises(ParamsError, match="data.source = 'embedded' holds MNIST digits only"):
        load_params(params_file, ["data.dataset=fashion-mnist"])
    with pytest.raises(ParamsError, match="parameters file not found"):
        load_params(tmp_path / "none.yaml")
    text = params_file.read_text()
    params_file.write_text(text.replace("  latent_dim: 20", "  latent_dims: 20"))
    with pytest.raises(ParamsError, match="unknown parameter 'model.latent_dims'; did you mean"):
        load_params(params_file)
    params_file.write_text(text.replace("  latent_dim: 20", "  # latent_dim: 20"))
    with pytest.raises(ParamsError, match="missing key 'model.latent_dim'"):
        load_params(params_file)
    params_file.write_text(text + "\nextras:\n  x: 1\n")
    with pytest.raises(ParamsError, match="unknown section 'extras'"):
        load_params(params_file)
    params_file.write_text("data: [1, 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(params_file)


def test_write_params_keeps_comments_and_layout_and_refuses_bad_values(params_file: Path) -> None:
    original = params_file.read_bytes()
    before = params_file.read_text().splitlines()
    result = write_params(params_file, ["data.split_seed=7", "model.hidden_sizes=[512, 256]"])
    after = params_file.read_text().splitlines()
    assert result.data.split_seed == 7
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 2
    assert changed[0][1].startswith("  split_seed: 7") and "# seed of the train" in changed[0][1]
    assert changed[1][1].startswith("  hidden_sizes: [512, 256]") and "#" in changed[1][1]
    assert load_params(params_file).model.hidden_sizes == (512, 256)
    # Values written and written back: the same bytes.
    write_params(params_file, ["data.split_seed=0", "model.hidden_sizes=[400]"])
    write_params(params_file, ["data.source=/a/rather/long/folder/path/to/mnist"])
    write_params(params_file, ["data.source=embedded"])
    assert params_file.read_bytes() == original
    # Bad values are refused without touching the file; mappings are taken too.
    with pytest.raises(ParamsError, match="train.lr = 5 is not allowed"):
        write_params(params_file, ["train.lr=5"])
    with pytest.raises(ParamsError, match="did you mean 'train.epochs'"):
        write_params(params_file, {"train.epoch": 5})
    assert params_file.read_bytes() == original
    assert sorted(p.name for p in params_file.parent.iterdir()) == ["params.yaml"]
    write_params(params_file, {"train": {"epochs": 2}, "data.val_size": 50})
    p = load_params(params_file)
    assert p.train.epochs == 2 and p.data.val_size == 50


def test_flatten_gives_dotted_strings_that_round_trip(params_file: Path) -> None:
    params = load_params(params_file)
    flat = params.flat()
    assert set(flat) == set(KNOWN_KEYS)
    shown = ("train.lr", "model.hidden_sizes", "train.compile", "data.source")
    assert [flat[k] for k in shown] == ["0.002", "[400]", "false", "embedded"]
    assert all(isinstance(v, str) for v in flat.values())
    assert load_params(params_file, [f"{k}={v}" for k, v in flat.items()]) == params


def test_replace_checks_overrides_and_hash_follows_the_values(params_file: Path) -> None:
    base = load_params(params_file)
    trial = base.replace({"train.lr": 0.003, "model.latent_dim": 10})
    assert (trial.train.lr, trial.model.latent_dim) == (0.003, 10)
    assert base.train.lr == 0.002  # the original is untouched
    assert trial.hash() != base.hash()
    assert base.replace(["train.lr=0.002"]).hash() == base.hash()
    with pytest.raises(ParamsError, match="train.lr = 3 is not allowed"):
        base.replace(["train.lr=3"])
    with pytest.raises(ParamsError, match="did you mean 'model.latent_dim'"):
        base.replace({"model.latent": 3})
