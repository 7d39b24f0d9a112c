"""The MLflow model and the registry against a real MLflow backend (a copy of the session's
initialised SQLite store, local artifacts).

Two tiny VAEs whose decoders predict a constant pixel probability differ clearly in NLL on
sparse binary images: good (p = 0.1, the data's rate) < bad (p = 0.5). Each test registers them
under its own model name. The gate's other modes and decisions: test_pipeline_e2e."""

import json
import math
import shutil
import sqlite3
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, child_env, wait_for
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from flows import alias_log, model_io, registry
from flows.alias_log import history_table, read_history, registry_lock
from flows.model_io import load_vae, load_vae_with_config, log_vae
from flows.params import PromoteConfig
from flows.promotion import GateError, apply_gate, evaluate_gate, score_champion
from flows.registry import promote_version, register_version, rollback
from vae_core.evaluation.likelihood import iwae_log_likelihood
from vae_core.models import VAEConfig, build_vae

PIXEL_RATES = {"good": 0.1, "bad": 0.5}
GATE = {"margin_nats": 1.0, "bootstrap_samples": 500, "confidence": 0.95}
#: Sparse binary images (about 10% ones): the frozen test set of the gate's comparisons.
X = (torch.rand(48, 1, 28, 28, generator=torch.Generator().manual_seed(1)) < 0.1).float()


@pytest.fixture(scope="module")
def backend(empty_mlflow_db: Path, tmp_path_factory, isolated_mlflow_uri) -> SimpleNamespace:
    """The session's empty store (its tables already made), copied; the global
    tracking URI points at it for the module and is given back after (isolated_mlflow_uri)."""
    root = tmp_path_factory.mktemp("mlflow")
    shutil.copy2(empty_mlflow_db, root / "mlflow.db")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("registry-tests", artifact_location=root.as_uri())
    return SimpleNamespace(root=root, uri=uri, client=client, experiment_id=experiment_id)


@pytest.fixture(scope="module")
def logged(backend) -> dict:
    """Each tiny VAE, its decoder's output (almost) the constant pixel rate, logged by log_vae
    in its own run."""
    out = {}
    for label, rate in PIXEL_RATES.items():
        model = build_vae({"hidden_sizes": [16], "latent_dim": 2}, seed=0).eval()
        with torch.no_grad():
            model.decoder.net[-1].weight.mul_(0.01)
            model.decoder.net[-1].bias.fill_(math.log(rate / (1 - rate)))
        with mlflow.start_run(experiment_id=backend.experiment_id, run_name=label) as run:
            log_vae(model, "binarized")
        out[label] = {"model": model, "run_id": run.info.run_id}
    return out


@pytest.fixture
def name(request: pytest.FixtureRequest) -> str:
    return registry.registered_model_name(request.node.name.replace("[", "-").replace("]", ""))


def _register(logged: dict, label: str, name: str, **tags: str) -> str:
    mv = register_version(
        logged[label]["run_id"], name, "model", {"label": label, **tags}, f"{label} model"
    )
    return str(mv.version)


def _aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(name).aliases.items()}


def _gate(client, name, version, champion_version, floor=1e6):
    """The flow's sequence: the challenger's per-example NLL as evaluation computes it, the
    champion scored on the same examples and noise, decide, apply."""
    indices = np.arange(len(X))
    challenger, config = load_vae_with_config(f"models:/{name}/{version}")
    challenger_nll = -iwae_log_likelihood(challenger, X, 4, seed=0, indices=indices)
    champion_nll = None
    if champion_version is not None:
        champion_uri = f"models:/{name}@champion"
        champion_nll = score_champion(champion_uri, X, indices, config, k=4, seed=0)
    gate = PromoteConfig(mode="enabled", floor_nll=floor, **GATE)
    decision = evaluate_gate(challenger_nll, champion_nll, gate, seed=0)
    apply_gate(client, name, version, decision, "enabled", champion=champion_version)
    return decision


#: Each architecture and likelihood: VAEConfig fields, and the data variant trained on.
TANH = {"hidden_sizes": [16, 16], "activation": "tanh"}
MLP2 = {"architecture": "mlp2", "latent_dim": 6, "top_hidden_sizes": [8], "top_latent_dim": 3}
CB = {"hidden_sizes": [16], "likelihood": "continuous_bernoulli"}
VARIANTS = {
    "burda-one-layer": (TANH | {"latent_dim": 5}, "binarized"),
    "burda-two-layer": (TANH | MLP2, "binarized"),
    "conv": ({"architecture": "conv", "hidden_sizes": [16]}, "binarized"),
    "continuous-bernoulli": (CB, "continuous"),
}


@pytest.mark.parametrize("kind", VARIANTS)
def test_each_model_variant_is_logged_registered_and_served_without_pickle(
    backend, kind, name, tmp_path
):
    """Each architecture and likelihood through logging, the registry and serving: safetensors
    and the served code, no pickle; the very weights loaded back; a pyfunc that scores alike."""
    fields, variant = VARIANTS[kind]
    config = VAEConfig(**{"latent_dim": 2} | fields)
    model, arch = build_vae(config, seed=0).eval(), (config.architecture, config.likelihood)
    with mlflow.start_run(experiment_id=backend.experiment_id) as run:
        info = log_vae(model, variant)
    register_version(run.info.run_id, name, "model", {}, "a variant", model_uri=info.model_uri)

    root = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path)))
    files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    weights = f"artifacts/{model_io.SAFETENSORS_NAME}"
    expected = "served_model.py code/vae_core/models/vae.py artifacts/model_config.json MLmodel"
    assert {*expected.split(), "input_example.json", "serving_input_example.json", weights} <= files
    assert not any(f.endswith((".pth", ".pkl", ".pt2")) for f in files)
    mlmodel = Model.load(str(root))
    meta = mlmodel.metadata
    assert (meta["vae_weights"], meta["vae_weights_format"]) == (weights, "safetensors")
    assert meta["vae_methods"] == "reconstruct, encode, decode, sample, log_likelihood"
    assert mlmodel.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert mlmodel.signature.inputs is None  # each method checks its own inputs
    params = mlmodel.signature.params.to_dict()
    kinds = [(p["name"], p["type"]) for p in params]
    assert kinds == [("method", "string"), ("n", "long"), ("k", "long"), ("seed", "long")]
    assert (params[0]["default"], params[0]["shape"]) == ("reconstruct", None)
    example = json.loads((root / "serving_input_example.json").read_text())
    assert np.asarray(example["inputs"]).shape == (2, 1, 28, 28)
    assert example["params"] == {"method": "reconstruct"}

    uri, original = f"models:/{name}/1", model.state_dict()
    for loaded in (f"runs:/{run.info.run_id}/model", uri):
        rebuilt, saved = load_vae_with_config(loaded)
        assert type(rebuilt) is type(model) and saved["data_variant"] == variant
        assert (saved["architecture"], saved["likelihood"]) == arch
        assert rebuilt.state_dict().keys() == original.keys()
        assert all(torch.equal(v, original[k]) for k, v in rebuilt.state_dict().items())
    draw = [m.sample(3, torch.Generator().manual_seed(0)) for m in (rebuilt, model)]
    assert torch.equal(*draw)
    assert max(model_io.verify_logged_model(uri).values()) <= 1e-5  # reconstruct, encode
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = (x < 0.2).float() if variant == "binarized" else x
    served = mlflow.pyfunc.load_model(uri)
    np.testing.assert_allclose(served.predict(x.numpy()), model.reconstruct(x).detach(), atol=1e-5)
    scored = served.predict(x.numpy(), params={"method": "log_likelihood", "k": 4, "seed": 3})
    own = iwae_log_likelihood(model, x, 4, seed=3)
    np.testing.assert_allclose(np.asarray(scored["log_likelihood"]), own, rtol=1e-5)
    assert np.isfinite(own).all() and f"({variant} pixels)" in scored["estimator"]


def test_register_two_versions(backend, logged, name):
    v1 = _register(logged, "good", name, **{"dvc.processed_md5": "abc"})
    assert (v1, _register(logged, "bad", name)) == ("1", "2")
    assert _aliases(backend.client, name) == {"challenger": "2"}
    mv1 = backend.client.get_model_version(name, v1)
    assert (mv1.tags["dvc.processed_md5"], mv1.description) == ("abc", "good model")
    assert mv1.run_id == logged["good"]["run_id"]
    bias = {k: load_vae(f"models:/{name}{k}").decoder.net[-1].bias for k in ("/1", "@challenger")}
    assert torch.equal(bias["/1"], logged["good"]["model"].decoder.net[-1].bias)
    assert torch.equal(bias["@challenger"], logged["bad"]["model"].decoder.net[-1].bias)
    with pytest.raises(model_io.ModelLoadError):
        load_vae(f"models:/{name}/9")


def test_the_gate_keeps_out_what_misses_the_floor_and_promotes_a_better_one(backend, logged, name):
    """A worse one staying out is checked through a pipeline run (test_pipeline_e2e, run F)."""
    client = backend.client
    v1 = _register(logged, "bad", name)  # p = 0.5: 784 ln 2 = 543 nats per image
    assert not _gate(client, name, v1, None, floor=100.0).promote
    assert "champion" not in _aliases(client, name)
    mv1 = client.get_model_version(name, v1)
    assert mv1.tags["gate.decision"] == "reject" and "> floor 100.0" in mv1.tags["gate.reason"]
    assert "not promoted" in mv1.description
    v2 = _register(logged, "bad", name)
    assert _gate(client, name, v2, None, floor=600.0).promote
    assert _aliases(client, name) == {"champion": v2, "challenger": v2}

    v3 = _register(logged, "good", name)
    better = _gate(client, name, v3, v2)
    assert better.promote and better.figures["ci_low"] > GATE["margin_nats"]
    assert _aliases(client, name) == {"champion": v3, "previous-champion": v2, "challenger": v3}
    assert client.get_model_version(name, v3).tags["gate.previous_champion"] == v2
    assert client.get_model_version(name, v2).tags["gate.replaced_by"] == v3
    history = read_history(client, name)
    assert [(e["action"], e["alias"], e["from"], e["to"]) for e in history[-2:]] == [
        ("gate promote", "champion", v2, v3),
        ("gate promote", "previous-champion", None, v2),
    ]
    assert history[-1]["figures"]["n"] == len(X)  # the gate's figures travel along
    # The champion is scored where the challenger was evaluated (its importance samples come
    # from that device's generator); a device this machine lacks is said, not swapped for the CPU.
    if not torch.cuda.is_available():
        with pytest.raises(GateError, match="evaluated on cuda:0, which this machine lacks"):
            score_champion(f"models:/{name}/{v2}", X, np.arange(len(X)), {}, 4, 0, "cuda:0")


def test_gate_rules_on_paired_figures():
    rng = np.random.default_rng(0)
    champion = 100 + rng.normal(0, 5, 400)
    kw = {"gate": PromoteConfig(mode="enabled", floor_nll=150.0, **GATE), "seed": 0}
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


def test_manual_moves_refusals_and_the_history_table(backend, logged, name):
    """The tags and descriptions of manual moves are checked through the CLI (test_pipeline_e2e)."""
    client = backend.client
    v1 = _register(logged, "good", name)
    v2 = _register(logged, "bad", name)
    with pytest.raises(registry.RegistryError, match="nothing to roll back to"):
        rollback(name, "no champion history yet", "tester")
    with pytest.raises(registry.RegistryError, match="no version '7'"):
        promote_version(name, "7", "typo", "tester")
    with pytest.raises(ValueError, match="reason"):
        promote_version(name, v1, "  ", "tester")
    promote_version(name, v1, "first champion", "bob", client=client)
    change = promote_version(name, v2, "second", "bob", client=client)
    assert (change.champion, change.previous_champion) == (v2, v1)
    back = rollback(name, "back to the first", "carol", client=client)
    assert (back.champion, back.previous_champion) == (v1, v2)
    rows = history_table(read_history(client, name)).splitlines()[2:]
    assert len(rows) == 2 + 1 + 2 + 2  # challenger x2, promote (1 alias), promote x2, rollback x2
    assert rows[-2].startswith("| 6 |") and "| carol | rollback | champion | 2 | 1 |" in rows[-2]
    assert "| back to the first |" in rows[-1]
    # The model's page shows the same table (its description renders Markdown).
    description = client.get_registered_model(name).description
    assert description.startswith("**Alias history** (the latest 7 of 7 moves")
    assert rows[-2] in description


def test_the_registry_lock_serializes_a_second_writer(backend, logged, name, start_process):
    """A manual promote in another process waits while the lock is held (it says so), and goes
    through once it is released: nothing is lost, nothing is overwritten."""
    client = backend.client
    v1 = _register(logged, "good", name)
    script = (
        "import mlflow\n"
        "from flows.registry import promote_version\n"
        f"mlflow.set_tracking_uri({backend.uri!r})\n"
        f"promote_version({name!r}, {v1!r}, 'from another workspace', 'dave')\n"
        "print('done', flush=True)\n"
    )
    with registry_lock(client, name, "the test"):
        cmd = [sys.executable, "-c", script]
        writer = start_process(f"writer-{name}", cmd, env=child_env(), cwd=REPO_ROOT)
        said = f"waiting for the registry lock '{name}.lock' held by the test"
        wait_for("the writer to say it waits", lambda: said in writer.tail(), 180, writer, 0.2)
        assert "champion" not in _aliases(client, name)
    assert writer.popen.wait(180) == 0, writer.tail()
    assert "done" in writer.tail().splitlines()
    assert _aliases(client, name)["champion"] == v1
    assert read_history(client, name)[-1]["actor"] == "dave"
    with pytest.raises(MlflowException):  # the lock is gone again
        client.get_registered_model(alias_log.lock_name(name))


def test_a_live_holder_times_a_writer_out_and_a_dead_one_is_taken_over(
    backend, logged, name, capsys
):
    client = backend.client
    v1 = _register(logged, "good", name)
    capsys.readouterr()
    with registry_lock(client, name, "alice"):  # alive: the writer waits, then gives up
        busy = rf"the alias lock '{name}.lock' is held by alice \(for \d+ s\); waited 1 s"
        bob = registry_lock(client, name, "bob", 1.0)
        with pytest.raises(alias_log.RegistryBusy, match=busy), bob:
            pytest.fail("entered a lock another holder has")
    assert f"waiting for the registry lock '{name}.lock' held by alice" in capsys.readouterr().err

    # A holder that died holding the lock leaves it behind; once it is older than the lease
    # (its row written as a lock taken alias_log.LEASE_S + 60 s ago), the next writer takes it over.
    client.create_registered_model(alias_log.lock_name(name), tags={"lock.holder": "a killed run"})
    with sqlite3.connect(backend.root / "mlflow.db") as db:
        db.execute(
            "UPDATE registered_models SET creation_time = creation_time - ? WHERE name = ?",
            (int((alias_log.LEASE_S + 60) * 1000), alias_log.lock_name(name)),
        )
    promote_version(name, v1, "after the crash", "carol", client=client)
    assert "waiting" not in capsys.readouterr().err  # taken over, not waited for
    assert _aliases(client, name)["champion"] == v1
    with pytest.raises(MlflowException):
        client.get_registered_model(alias_log.lock_name(name))
