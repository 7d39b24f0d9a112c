"""params.yaml: defaults, overrides, validation of every key, comment-preserving writes."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

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

EXPECTED = {
    "data": {
        "dataset": "mnist",
        "source": "embedded",
        "val_size": 500,
        "holdout_size": 500,
        "split_seed": 0,
        "binarize_seed": 0,
    },
    "fetch": {"retries": 3, "backoff_s": 1.0},
    "model": {
        "architecture": "mlp",
        "hidden_sizes": [400],
        "latent_dim": 20,
        "likelihood": "bernoulli",
        "activation": "relu",
        "top_hidden_sizes": [100, 100],
        "top_latent_dim": 50,
    },
    "train": {
        "data_variant": "binarized",
        "epochs": 300,
        "batch_size": 128,
        "lr": 0.002,
        "lr_schedule": "exponential",
        "lr_final": 0.1,
        "objective": "elbo",
        "iwae_k": 1,
        "beta": 1.0,
        "warmup_epochs": 0,
        "patience": 20,
        "max_minutes": 0.0,
        "seed": 0,
        "device": "auto",
        "compile": False,
    },
    "evaluate": {"iwae_k": 100, "iwae_test_size": 1000, "num_samples": 1000, "seed": 0},
    "classifier": {"epochs": 5, "batch_size": 128, "lr": 0.002, "seed": 0},
    "promote": {
        "mode": "enabled",
        "floor_nll": 250.0,
        "margin_nats": 0.1,
        "bootstrap_samples": 2000,
        "confidence": 0.95,
    },
}


@pytest.fixture
def params_file(tmp_path: Path, repo_root: Path) -> Path:
    path = tmp_path / "params.yaml"
    shutil.copy(repo_root / "params.yaml", path)
    return path


def test_repo_params_are_the_documented_defaults(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    assert params.to_dict() == EXPECTED
    assert list(SECTIONS) == list(EXPECTED)
    assert {s: set(cls.names()) for s, cls in SECTIONS.items()} == {
        s: set(k) for s, k in EXPECTED.items()
    }
    # The dataclass defaults are the documented defaults too: one place for both.
    assert {s: cls().to_dict() for s, cls in SECTIONS.items()} == EXPECTED


def test_the_tree_is_typed_and_frozen(repo_root: Path) -> None:
    params = load_params(repo_root / "params.yaml")
    assert params.train.epochs == 300 and params.evaluate.iwae_k == 100
    assert params.model.hidden_sizes == (400,)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.epochs = 3  # type: ignore[misc]


def test_every_key_in_params_yaml_has_a_comment(repo_root: Path) -> None:
    for line in (repo_root / "params.yaml").read_text().splitlines():
        if line.startswith("  ") and ":" in line:
            assert "#" in line, f"no comment on: {line!r}"


def test_overrides_are_parsed_as_yaml(params_file: Path) -> None:
    p = load_params(
        params_file,
        [
            "train.epochs=3",
            "train.lr=1e-3",
            "train.compile=true",
            "model.hidden_sizes=[512, 256]",
            "data.source=/data/mnist folder",
            "train.device=cuda:1",
        ],
    )
    assert p.train.epochs == 3
    assert p.train.lr == pytest.approx(0.001)  # YAML 1.2 float, as DVC reads it
    assert p.train.compile is True
    assert p.model.hidden_sizes == (512, 256)
    assert p.data.source == "/data/mnist folder"
    assert p.train.device == "cuda:1"
    assert yaml.safe_load(params_file.read_text())["train"]["epochs"] == 300  # file untouched


@pytest.mark.parametrize(
    ("override", "suggestion"),
    [
        ("data.splt_seed=1", "data.split_seed"),
        ("train.epoch=1", "train.epochs"),
        ("evaluate.iwae=5", "evaluate.iwae_k"),
        ("trian.lr=0.1", "train.lr"),
    ],
)
def test_unknown_key_is_refused_with_a_suggestion(
    params_file: Path, override: str, suggestion: str
) -> None:
    key = override.split("=")[0]
    with pytest.raises(
        ParamsError, match=rf"unknown parameter '{key}'; did you mean '{suggestion}'\?"
    ):
        load_params(params_file, [override])


def test_override_needs_key_and_value() -> None:
    with pytest.raises(ParamsError, match="expected the form key.sub=value"):
        parse_override("train.epochs")


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("data.dataset=cifar10", "one of mnist, fashion-mnist, kmnist"),
        ("data.source=''", "'embedded', 'download', or a folder path"),
        ("data.val_size=0", "an integer >= 1"),
        ("data.split_seed=-1", "an integer >= 0"),
        ("data.binarize_seed=1.5", "an integer >= 0"),
        ("fetch.retries=-1", "an integer >= 0"),
        ("fetch.backoff_s=-0.5", "a number >= 0"),
        ("model.architecture=resnet", "one of mlp, conv"),
        ("model.hidden_sizes=400", "a non-empty list of integers >= 1"),
        ("model.hidden_sizes=[]", "a non-empty list of integers >= 1"),
        ("model.hidden_sizes=[400, 0]", "a non-empty list of integers >= 1"),
        ("model.latent_dim=0", "an integer >= 1"),
        ("model.likelihood=gaussian", "one of bernoulli, continuous_bernoulli"),
        ("train.data_variant=grey", "one of binarized, continuous"),
        ("train.epochs=-1", "an integer >= 0"),
        ("train.epochs=true", "an integer >= 0"),
        ("train.batch_size=12.0", "an integer >= 1"),
        ("train.lr=0", r"a number in \(0, 1\]"),
        ("train.lr=1.5", r"a number in \(0, 1\]"),
        ("train.lr=.nan", r"a number in \(0, 1\]"),
        ("train.beta=-1", "a number >= 0"),
        ("train.warmup_epochs=-1", "an integer >= 0"),
        ("train.patience=-2", "an integer >= 0"),
        ("train.seed=x", "an integer >= 0"),
        ("train.device=gpu", "auto, cpu, cuda, mps or cuda:N"),
        ("train.device=cuda:", "auto, cpu, cuda, mps or cuda:N"),
        ("train.compile=1", "true or false"),
        ("evaluate.iwae_k=0", "an integer >= 1"),
        ("evaluate.iwae_test_size=-1", "an integer >= 0"),
        ("evaluate.num_samples=0", "an integer >= 1"),
        ("classifier.lr=2", r"a number in \(0, 1\]"),
        ("classifier.epochs=0", "an integer >= 1"),
        ("promote.mode=on", "one of disabled, dry-run, enabled"),
        ("promote.floor_nll=.inf", "a finite number"),
        ("promote.margin_nats=-0.1", "a number >= 0"),
        ("promote.bootstrap_samples=0", "an integer >= 1"),
        ("promote.confidence=1.0", r"a number in \(0, 1\)"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(
    params_file: Path, override: str, allowed: str
) -> None:
    key = override.split("=")[0]
    with pytest.raises(ParamsError, match=rf"{key} = .* is not allowed: expected {allowed}"):
        load_params(params_file, [override])


def test_good_edge_values_pass(params_file: Path) -> None:
    load_params(
        params_file,
        [
            "train.lr=1",
            "train.beta=0",
            "evaluate.iwae_test_size=0",
            "evaluate.iwae_k=1",
            "promote.mode=dry-run",
            "model.likelihood=continuous_bernoulli",
            "train.device=mps",
            "data.dataset=kmnist",
            "data.source=download",
        ],
    )


def test_embedded_source_only_for_mnist(params_file: Path) -> None:
    with pytest.raises(ParamsError, match="data.source = 'embedded' holds MNIST digits only"):
        load_params(params_file, ["data.dataset=fashion-mnist"])


def test_file_level_problems(tmp_path: Path, params_file: Path) -> None:
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


def test_build_params_round_trips_plain_data() -> None:
    assert build_params(EXPECTED).to_dict() == EXPECTED


def test_write_params_keeps_comments_and_layout(params_file: Path) -> None:
    before = params_file.read_text().splitlines()
    result = write_params(params_file, ["data.split_seed=7", "model.hidden_sizes=[512, 256]"])
    after = params_file.read_text().splitlines()
    assert result.data.split_seed == 7
    changed = [(a, b) for a, b in zip(before, after, strict=True) if a != b]
    assert len(changed) == 2
    assert changed[0][1].startswith("  split_seed: 7") and "# seed of the train" in changed[0][1]
    assert changed[1][1].startswith("  hidden_sizes: [512, 256]") and "#" in changed[1][1]
    assert load_params(params_file).model.hidden_sizes == (512, 256)


def test_write_params_accepts_mappings(params_file: Path) -> None:
    write_params(params_file, {"train": {"epochs": 2}, "data.val_size": 50})
    p = load_params(params_file)
    assert p.train.epochs == 2 and p.data.val_size == 50


def test_write_params_refuses_bad_values_without_touching_the_file(params_file: Path) -> None:
    before = params_file.read_bytes()
    with pytest.raises(ParamsError, match="train.lr = 5 is not allowed"):
        write_params(params_file, ["train.lr=5"])
    with pytest.raises(ParamsError, match="did you mean 'train.epochs'"):
        write_params(params_file, {"train.epoch": 5})
    assert params_file.read_bytes() == before
    assert sorted(p.name for p in params_file.parent.iterdir()) == ["params.yaml"]


def test_flatten_gives_dotted_strings_that_round_trip(params_file: Path) -> None:
    params = load_params(params_file)
    flat = params.flat()
    assert set(flat) == set(KNOWN_KEYS)
    assert flat["train.lr"] == "0.002"
    assert flat["model.hidden_sizes"] == "[400]"
    assert flat["train.compile"] == "false"
    assert flat["data.source"] == "embedded"
    assert all(isinstance(v, str) for v in flat.values())
    assert load_params(params_file, [f"{k}={v}" for k, v in flat.items()]) == params


def test_write_params_round_trip_is_byte_identical(params_file: Path) -> None:
    before = params_file.read_bytes()
    write_params(params_file, ["data.source=/a/rather/long/folder/path/to/mnist"])
    write_params(params_file, ["data.source=embedded"])
    assert params_file.read_bytes() == before


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
