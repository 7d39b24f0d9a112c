"""The one atomic-write primitive, and the one VAE rebuild path built on the saved files."""

import json
from pathlib import Path

import pytest
import torch
from helpers import TWO_LAYER

from vae_core.atomic import atomic_torch_save, atomic_write_text
from vae_core.models import VAEConfig, build_vae
from vae_core.training import load_model, save_model
from vae_core.training.checkpoint import MODEL_CONFIG_NAME, ModelFileError, rebuild_vae


def test_atomic_writes_keep_the_old_file_and_same_tensors_same_bytes(tmp_path: Path) -> None:
    """Same tensors, same bytes, whatever the file's name (the file's DVC hash)."""
    target = tmp_path / "sub" / "w.pt"
    atomic_torch_save({"w": torch.arange(3)}, target)  # creates the missing folder
    before = target.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"w": Unsaveable()}, target)
    assert target.read_bytes() == before
    assert [p.name for p in target.parent.iterdir()] == ["w.pt"]
    atomic_write_text(tmp_path / "a.json", "é\n")
    assert (tmp_path / "a.json").read_bytes() == "é\n".encode()
    state = {"w": torch.arange(6.0).reshape(2, 3)}
    atomic_torch_save(state, tmp_path / "a.pt")
    atomic_torch_save(state, tmp_path / "b.pt")
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    assert torch.equal(loaded["w"], state["w"])


@pytest.mark.parametrize("config", [VAEConfig(hidden_sizes=[8], latent_dim=2), TWO_LAYER])
def test_saved_model_round_trips_and_mismatches_name_the_files(tmp_path: Path, config) -> None:
    """Weights and config alone (no pickle) rebuild the same model, of either family."""
    model = build_vae(config, seed=3)
    weights = save_model(model, model.config.to_dict(), tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert not loaded.training and type(loaded) is type(model) and loaded.config == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name]), name
    config_path = tmp_path / "m" / MODEL_CONFIG_NAME
    config_path.write_text(json.dumps(model.config.to_dict() | {"latent_dim": 3}))
    with pytest.raises(ModelFileError, match=r"model.pt: weights do not fit .*model_config.json"):
        rebuild_vae(weights, config_path)
    config_path.write_text("[1, 2]")
    with pytest.raises(ModelFileError, match="expected a JSON object, found list"):
        load_model(tmp_path / "m")
    (tmp_path / "m" / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match="expected a saved model file"):
        load_model(tmp_path / "m")
