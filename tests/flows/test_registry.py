"""The MLflow model and the registry against a real MLflow backend (SQLite + local artifacts).

Three tiny VAEs (hidden [16], latent 2) whose decoders predict a constant pixel probability
differ clearly in NLL on sparse binary images: good (p = 0.1, the data's rate) < bad (p = 0.5)
< terrible (p = 0.95). They are logged once per module; each test registers them under its own
model name, so tests do not see each other's aliases.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from flows.alias_log import history_table, read_history, registry_lock
from flows.model_io import (
    SAFETENSORS_NAME,
    ModelLoadError,
    UnsafeModelError,
    load_vae,
    load_vae_with_config,
    log_vae,
    verify_logged_model,
)
from flows.params import PromoteConfig
from flows.promotion import apply_gate, evaluate_gate, score_champion
from flows.registry import (
    ALIAS_CHALLENGER,
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    RegistryError,
    promote_version,
    register_version,
    registered_model_name,
    rollback,
)
from vae_core.models import VAEConfig, build_vae
from vae_core.training import load_model, save_model
from vae_core.training.checkpoint import UnsafeWeightsError

PIXEL_RATES = {"good": 0.1, "bad": 0.5, "terrible": 0.95}
GATE = {"margin_nats": 1.0, "bootstrap_samples": 500, "confidence": 0.95}


def _config(floor: float, mode: str = "enabled") -> PromoteConfig:
    return PromoteConfig(mode=mode, floor_nll=floor, **GATE)


def _tiny_vae(pixel_rate: float) -> torch.nn.Module:
    """A tiny VAE whose decoder outputs (almost) the constant probability `pixel_rate`."""
    torch.manual_seed(0)
    model = build_vae({"hidden_sizes": [16], "latent_dim": 2})
    last = model.decoder.net[-1]
    with torch.no_grad():
        last.weight.mul_(0.01)
        last.bias.fill_(math.log(pixel_rate / (1 - pixel_rate)))
    return model.eval()


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class _PayloadModule(torch.nn.Module):
    """An nn.Module (so MLflow's pickle flavour accepts it) that pickles as _Payload."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = str(marker)

    def __reduce__(self):
        return _Payload(Path(self.marker)).__reduce__()


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory):
    """A real tracking backend in a temp folder; restores the global URI afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{root}/mlflow.db")
    client = MlflowClient()
    experiment_id = client.create_experiment("registry-tests", artifact_location=root.as_uri())
    yield {"root": root, "client": client, "experiment_id": experiment_id}
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def logged(backend) -> dict:
    """Each tiny VAE saved with save_model, logged by log_vae in its own run."""
    out = {}
    for label, rate in PIXEL_RATES.items():
        model = _tiny_vae(rate)
        model_dir = backend["root"] / "saved" / label
        save_model(model, model.config.to_dict() | {"data_variant": "binarized"}, model_dir)
        with mlflow.start_run(experiment_id=backend["experiment_id"], run_name=label) as run:
            info = log_vae(model, "binarized")
        out[label] = {"model": model, "run_id": run.info.run_id, "info": info, "dir": model_dir}
    return out


@pytest.fixture(scope="module")
def test_x() -> torch.Tensor:
    """Sparse binary images (about 10% ones): the frozen test set of the comparisons."""
    gen = torch.Generator().manual_seed(1)
    return (torch.rand(48, 1, 28, 28, generator=gen) < 0.1).float()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return registered_model_name(request.node.name.replace("[", "-").replace("]", ""))


def _register(logged: dict, label: str, name: str, **tags: str) -> str:
    mv = register_version(
        logged[label]["run_id"], name, "model", {"label": label, **tags}, f"{label} model"
    )
    return str(mv.version)


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return client.get_model_version(name, version).tags


def _gate(logged, client, name, version, champion_version, test_x, floor=1e6, mode="enabled"):
    """The flow's sequence: the challenger's per-example NLL as evaluation computes it, the
    champion scored on the same examples and noise, decide, apply."""
    from vae_core.evaluation.likelihood import iwae_log_likelihood

    indices = np.arange(len(test_x))
    challenger, config = load_vae_with_config(f"models:/{name}/{version}")
    challenger_nll = -iwae_log_likelihood(challenger, test_x, 4, seed=0, indices=indices)
    champion_nll = None
    if champion_version is not None:
        champion_uri = f"models:/{name}@{ALIAS_CHAMPION}"
        champion_nll = score_champion(champion_uri, test_x, indices, config, k=4, seed=0)
    decision = evaluate_gate(challenger_nll, champion_nll, _config(floor), seed=0)
    apply_gate(client, name, version, decision, mode, champion=champion_version)
    return decision


def test_logged_model_layout_and_both_reloads(backend, logged):
    entry = logged["good"]
    info = entry["info"]
    root = Path(
        mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(backend["root"] / "dl"))
    )
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    assert {
        "served_model.py",
        "code/vae_core/models/vae.py",
        f"artifacts/{SAFETENSORS_NAME}",
        "artifacts/model_config.json",
        "input_example.json",
        "serving_input_example.json",
        "MLmodel",
    } <= files
    assert not any(f.endswith((".pth", ".pkl", ".pt2")) for f in files)
    mlmodel = Model.load(str(root))
    assert mlmodel.metadata["vae_weights"] == f"artifacts/{SAFETENSORS_NAME}"
    assert mlmodel.metadata["vae_methods"] == "reconstruct, encode, decode, sample, log_likelihood"
    assert mlmodel.signature.inputs is None  # each method checks its own inputs
    assert mlmodel.signature.params.to_dict()[0] == {
        "name": "method",
        "type": "string",
        "default": "reconstruct",
        "shape": None,
    }
    example = json.loads((root / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]).shape == (2, 1, 28, 28)
    assert example["params"] == {"method": "reconstruct"}

    rebuilt, config = load_vae_with_config(f"runs:/{entry['run_id']}/model")
    assert config["data_variant"] == "binarized"
    original = entry["model"].state_dict()
    assert rebuilt.state_dict().keys() == original.keys()
    for key, value in rebuilt.state_dict().items():
        assert torch.equal(value, original[key]), key
    diffs = verify_logged_model(info.model_uri)  # the served code, loaded as a pyfunc
    assert max(diffs.values()) <= 1e-5
    assert torch.equal(
        rebuilt.sample(3, torch.Generator().manual_seed(0)),
        entry["model"].sample(3, torch.Generator().manual_seed(0)),
    )


@pytest.mark.parametrize(
    "config",
    [
        VAEConfig(hidden_sizes=[16, 16], latent_dim=5, activation="tanh"),
        VAEConfig(
            architecture="mlp2",
            hidden_sizes=[16, 16],
            latent_dim=6,
            activation="tanh",
            top_hidden_sizes=[8],
            top_latent_dim=3,
        ),
    ],
    ids=["burda-one-layer", "burda-two-layer"],
)
def test_each_model_variant_is_logged_registered_and_rebuilt_without_pickle(backend, config, name):
    model = build_vae(config, seed=0).eval()
    with mlflow.start_run(experiment_id=backend["experiment_id"]) as run:
        info = log_vae(model, "binarized")
    register_version(
        run.info.run_id, name, "model", {}, "a model variant", model_uri=info.model_uri
    )
    rebuilt, saved = load_vae_with_config(f"models:/{name}/1")
    assert type(rebuilt) is type(model) and saved["architecture"] == config.architecture
    x = (torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0)) < 0.2).float()
    torch.testing.assert_close(rebuilt.reconstruct(x), model.reconstruct(x))
    assert max(verify_logged_model(info.model_uri).values()) <= 1e-5  # the served code too


def test_register_two_versions(backend, logged, name):
    client = backend["client"]
    v1 = _register(logged, "good", name, **{"dvc.processed_md5": "abc"})
    v2 = _register(logged, "bad", name)
    assert (v1, v2) == ("1", "2")
    assert _aliases(client, name) == {ALIAS_CHALLENGER: "2"}
    mv1 = client.get_model_version(name, v1)
    assert mv1.tags["dvc.processed_md5"] == "abc" and mv1.description == "good model"
    assert mv1.run_id == logged["good"]["run_id"]
    by_alias = load_vae(f"models:/{name}@{ALIAS_CHALLENGER}")
    by_version = load_vae(f"models:/{name}/1")
    assert torch.equal(by_alias.decoder.net[-1].bias, logged["bad"]["model"].decoder.net[-1].bias)
    assert torch.equal(
        by_version.decoder.net[-1].bias, logged["good"]["model"].decoder.net[-1].bias
    )
    with pytest.raises(ModelLoadError):
        load_vae(f"models:/{name}/9")


def test_first_version_champion_only_when_meeting_the_floor(backend, logged, name, test_x):
    client = backend["client"]
    v1 = _register(logged, "bad", name)
    refused = _gate(logged, client, name, v1, None, test_x, floor=100.0)
    assert not refused.promote
    assert ALIAS_CHAMPION not in _aliases(client, name)
    tags = _tags(client, name, v1)
    assert tags["gate.decision"] == "reject" and "> floor 100.0" in tags["gate.reason"]
    assert "not promoted" in client.get_model_version(name, v1).description

    v2 = _register(logged, "good", name)
    accepted = _gate(logged, client, name, v2, None, test_x, floor=400.0)
    assert accepted.promote
    assert _aliases(client, name)[ALIAS_CHAMPION] == v2
    assert ALIAS_PREVIOUS not in _aliases(client, name)
    assert _tags(client, name, v2)["gate.decision"] == "promote"


def test_worse_challenger_kept_out_better_one_promoted(backend, logged, name, test_x):
    client = backend["client"]
    v1 = _register(logged, "bad", name)
    assert _gate(logged, client, name, v1, None, test_x).promote

    v2 = _register(logged, "terrible", name)
    worse = _gate(logged, client, name, v2, v1, test_x)
    assert not worse.promote
    assert worse.figures["mean_improvement"] < 0
    assert _aliases(client, name)[ALIAS_CHAMPION] == v1
    tags = _tags(client, name, v2)
    assert tags["gate.decision"] == "reject" and tags["gate.applied"] == "false"
    assert "not significant" in tags["gate.reason"]
    assert float(tags["gate.champion_mean_nll"]) < float(tags["gate.challenger_mean_nll"])
    assert tags["gate.reason"] in client.get_model_version(name, v2).description

    v3 = _register(logged, "good", name)
    better = _gate(logged, client, name, v3, v1, test_x)
    assert better.promote and better.figures["ci_low"] > GATE["margin_nats"]
    aliases = _aliases(client, name)
    assert aliases[ALIAS_CHAMPION] == v3 and aliases[ALIAS_PREVIOUS] == v1
    assert aliases[ALIAS_CHALLENGER] == v3
    assert _tags(client, name, v3)["gate.previous_champion"] == v1


def test_dry_run_and_disabled_record_but_move_nothing(backend, logged, name, test_x):
    client = backend["client"]
    v1 = _register(logged, "bad", name)
    _gate(logged, client, name, v1, None, test_x)
    v2 = _register(logged, "good", name)
    decision = _gate(logged, client, name, v2, v1, test_x, mode="dry-run")
    assert decision.promote
    assert _aliases(client, name)[ALIAS_CHAMPION] == v1
    tags = _tags(client, name, v2)
    assert (tags["gate.mode"], tags["gate.decision"], tags["gate.applied"]) == (
        "dry-run",
        "promote",
        "false",
    )
    assert "would promote" in client.get_model_version(name, v2).description

    v3 = _register(logged, "good", name)
    assert apply_gate(client, name, v3, None, "disabled") == "unchanged"
    assert _aliases(client, name)[ALIAS_CHAMPION] == v1
    tags = _tags(client, name, v3)
    assert (tags["gate.mode"], tags["gate.decision"]) == ("disabled", "not-evaluated")
    assert not any(k.startswith("gate.ci") for k in tags)
    with pytest.raises(ValueError, match="promote.mode = 'sometimes' is not allowed"):
        _config(1e6, mode="sometimes")


def test_manual_promote_and_rollback(backend, logged, name):
    client = backend["client"]
    v1 = _register(logged, "good", name)
    v2 = _register(logged, "bad", name)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(name, "no champion history yet", "tester")
    with pytest.raises(RegistryError, match="no version '7'"):
        promote_version(name, "7", "typo", "tester")
    with pytest.raises(ValueError, match="reason"):
        promote_version(name, v1, "  ", "tester")

    promote_version(name, v1, "first release", "alice")
    change = promote_version(name, v2, "try the new one", "bob")
    assert (change.champion, change.previous_champion) == (v2, v1)
    assert _aliases(client, name).items() >= {ALIAS_CHAMPION: v2, ALIAS_PREVIOUS: v1}.items()
    tags = _tags(client, name, v2)
    assert (tags["manual.action"], tags["manual.reason"], tags["manual.actor"]) == (
        "promote",
        "try the new one",
        "bob",
    )
    assert tags["manual.previous_champion"] == v1 and tags["manual.at"]
    assert _tags(client, name, v1)["manual.action"] == "demoted"

    back = rollback(name, "v2 draws blank digits", "carol")
    assert (back.champion, back.previous_champion) == (v1, v2)
    aliases = _aliases(client, name)
    assert (aliases[ALIAS_CHAMPION], aliases[ALIAS_PREVIOUS]) == (v1, v2)
    t1, t2 = _tags(client, name, v1), _tags(client, name, v2)
    assert (t1["manual.action"], t1["manual.reason"], t1["manual.actor"]) == (
        "rollback-to",
        "v2 draws blank digits",
        "carol",
    )
    assert (t2["manual.action"], t2["manual.replaced_by"]) == ("rolled-back", v1)
    assert "v2 draws blank digits" in client.get_model_version(name, v2).description


def test_gate_rules_on_paired_figures():
    rng = np.random.default_rng(0)
    champion = 100 + rng.normal(0, 5, 400)
    kw = {"gate": _config(150.0), "seed": 0}
    clearly_better = evaluate_gate(champion - 3 + rng.normal(0, 0.5, 400), champion, **kw)
    assert clearly_better.promote and clearly_better.figures["n"] == 400
    below_margin = evaluate_gate(champion - 0.5, champion, **kw)
    assert not below_margin.promote and "<= margin" in below_margin.reason
    noise = evaluate_gate(champion + rng.normal(0, 5, 400), champion, **kw)
    assert not noise.promote and "not significant" in noise.reason
    above_floor = evaluate_gate(champion + 60 - 5, champion + 60, **kw)
    assert not above_floor.promote and "floor" in above_floor.reason
    broken = evaluate_gate(np.array([1.0, np.nan]), None, **kw)
    assert not broken.promote and "non-finite" in broken.reason
    with pytest.raises(ValueError, match="paired"):
        evaluate_gate(champion[:10], champion, **kw)


def test_pickle_payloads_are_refused(backend, logged, tmp_path):
    marker = tmp_path / "marker.txt"
    config = logged["good"]["dir"] / "model_config.json"
    evil_pt = tmp_path / "evil" / "model.pt"
    evil_pt.parent.mkdir()
    torch.save({"weight": _Payload(marker)}, evil_pt)
    (evil_pt.parent / "model_config.json").write_bytes(config.read_bytes())

    # 1. A saved model folder (what evaluation loads) is read with weights_only=True.
    with pytest.raises(UnsafeWeightsError):
        load_model(evil_pt.parent)
    # 2. An MLflow model whose weights file beside it is a pickle payload.
    # 3. A pickle-flavoured MLflow model (model.pth) is refused without allow_pickle=True.
    with mlflow.start_run(experiment_id=backend["experiment_id"]) as run:
        mlflow.pytorch.log_model(
            torch.nn.Linear(2, 2),
            name="weights",
            serialization_format="pickle",
            extra_files=[str(evil_pt), str(evil_pt.parent / "model_config.json")],
            pip_requirements=["torch"],
        )
        mlflow.pytorch.log_model(
            _PayloadModule(marker),
            name="pickled",
            serialization_format="pickle",
            pip_requirements=["torch"],
        )
    with pytest.raises(UnsafeModelError, match="weights-only"):
        load_vae(f"runs:/{run.info.run_id}/weights")
    with pytest.raises(UnsafeModelError, match="allow_pickle"):
        load_vae(f"runs:/{run.info.run_id}/pickled")
    assert not marker.exists()

    # Control: the payload is live; with explicit consent the pickled model runs its code.
    with pytest.raises(Exception):  # noqa: B017 - exec returns None, which is not a model
        load_vae(f"runs:/{run.info.run_id}/pickled", allow_pickle=True)
    assert marker.read_text() == "pwned"


# --------------------------------------------------------------------------- races, history


def test_a_stale_gate_decision_moves_nothing_and_says_so(backend, logged, name, test_x):
    """The race, in order: the gate scores v3 against champion v1; a person promotes v2 by hand
    meanwhile; the gate's compare-and-set then finds v2, not v1, and moves nothing."""
    client = backend["client"]
    v1 = _register(logged, "bad", name)
    _gate(logged, client, name, v1, None, test_x)
    v2 = _register(logged, "terrible", name)
    v3 = _register(logged, "good", name)
    challenger, config = load_vae_with_config(f"models:/{name}/{v3}")
    indices = np.arange(len(test_x))
    from vae_core.evaluation.likelihood import iwae_log_likelihood

    challenger_nll = -iwae_log_likelihood(challenger, test_x, 4, seed=0, indices=indices)
    champion_nll = score_champion(f"models:/{name}/{v1}", test_x, indices, config, k=4, seed=0)
    decision = evaluate_gate(challenger_nll, champion_nll, _config(1e6), seed=0)
    assert decision.promote  # the gate would promote v3 over v1 ...

    promote_version(name, v2, "hand-picked while the gate was scoring", "alice", client=client)
    outcome = apply_gate(client, name, v3, decision, "enabled", champion=v1, actor="gate")
    assert outcome == "stale"  # ... but v1 is no longer champion: nothing moves
    assert _aliases(client, name)[ALIAS_CHAMPION] == v2
    tags = _tags(client, name, v3)
    assert tags["gate.decision"] == "stale" and tags["gate.applied"] == "false"
    assert "champion moved from 1 to 2" in tags["gate.reason"]
    history = read_history(client, name)
    assert [(e["action"], e["alias"], e["from"], e["to"]) for e in history] == [
        ("registered", ALIAS_CHALLENGER, None, v1),
        ("gate promote", ALIAS_CHAMPION, None, v1),
        ("registered", ALIAS_CHALLENGER, v1, v2),
        ("registered", ALIAS_CHALLENGER, v2, v3),
        ("manual promote", ALIAS_CHAMPION, v1, v2),
        ("manual promote", ALIAS_PREVIOUS, None, v1),
    ]
    assert history[4]["actor"] == "alice"
    assert history[4]["reason"] == "hand-picked while the gate was scoring"
    assert history[1]["figures"]["n"] == len(test_x)  # the gate's figures travel along


def test_history_table_lists_every_move(backend, logged, name):
    client = backend["client"]
    v1 = _register(logged, "good", name)
    v2 = _register(logged, "bad", name)
    promote_version(name, v1, "first champion", "bob", client=client)
    promote_version(name, v2, "second", "bob", client=client)
    rollback(name, "back to the first", "carol", client=client)
    table = history_table(read_history(client, name))
    rows = [line for line in table.splitlines()[2:]]
    assert len(rows) == 2 + 1 + 2 + 2  # challenger x2, promote (1 alias), promote x2, rollback x2
    assert rows[-2].startswith("| 6 |") and "| carol | rollback | champion | 2 | 1 |" in rows[-2]
    assert "| back to the first |" in rows[-1]
    # The model's page shows the same table (its description renders Markdown).
    description = client.get_registered_model(name).description
    assert description.startswith("**Alias history** (the latest 7 of 7 moves")
    assert rows[-2] in description


def test_the_registry_lock_serializes_a_second_writer(backend, logged, name, tmp_path):
    """A manual promote in another process waits while the lock is held (it says so on stderr),
    and goes through once it is released: nothing is lost, nothing is overwritten."""
    import subprocess
    import sys

    client = backend["client"]
    v1 = _register(logged, "good", name)
    script = (
        "import sys, mlflow\n"
        "from flows.registry import promote_version\n"
        f"mlflow.set_tracking_uri({mlflow.get_tracking_uri()!r})\n"
        f"promote_version({name!r}, {v1!r}, 'from another workspace', 'dave')\n"
        "print('done', flush=True)\n"
    )
    with registry_lock(client, name, "the test"):
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stderr=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        first = proc.stderr.readline()  # the writer reports that it waits: a point, not a clock
        assert f"waiting for the registry lock '{name}.lock' held by the test" in first
        assert ALIAS_CHAMPION not in _aliases(client, name)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.strip() == "done"
    assert _aliases(client, name)[ALIAS_CHAMPION] == v1
    assert read_history(client, name)[-1]["actor"] == "dave"
    with pytest.raises(MlflowException):  # the lock is gone again
        client.get_registered_model(f"{name}.lock")
