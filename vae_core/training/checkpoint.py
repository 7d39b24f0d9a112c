"""Checkpoints and saved models: everything needed to resume a run bit for bit, saved atomically,
and the one function that rebuilds a VAE from weights + config.

Files hold only tensors, numbers, strings and containers of them, so they load with
`torch.load(..., weights_only=True)` and never unpickle arbitrary objects.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from vae_core.atomic import atomic_torch_save, atomic_write_text
from vae_core.errors import VaeError
from vae_core.models.factory import build_vae
from vae_core.models.vae import VAE

CHECKPOINT_NAME = "last.pt"
BEST_WEIGHTS_NAME = "best.pt"
MODEL_WEIGHTS_NAME = "model.pt"
MODEL_CONFIG_NAME = "model_config.json"


class ModelFileError(VaeError, ValueError):
    """A saved model cannot be rebuilt: an unreadable config, weights that are not a plain
    state dict, or weights that do not fit the config. The message names the file."""


class UnsafeWeightsError(ModelFileError):
    """The weights file is not weights-only: reading it would unpickle arbitrary objects."""


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint saved by the trainer, without unpickling code; a file that is not
    weights-only is refused with an error naming it."""
    path = Path(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UnsafeWeightsError(
            f"{path}: not a weights-only checkpoint (refused to unpickle it): {exc}"
        ) from exc


def save_model(model: torch.nn.Module, config: dict, out_dir: Path) -> Path:
    """Write weights (weights-only torch file) and the model config (JSON) side by side."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out_dir / MODEL_WEIGHTS_NAME)
    atomic_write_text(out_dir / MODEL_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return out_dir / MODEL_WEIGHTS_NAME


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a weights-only torch file, on CPU; never unpickles objects."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise UnsafeWeightsError(
            f"{path}: not a weights-only torch file (refused to unpickle it): {exc}"
        ) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{path}: expected a state dict of tensors, found {type(state)}")
    return state


def read_model_config(path: Path) -> dict[str, Any]:
    """The model config JSON object written beside the weights."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ModelFileError(f"{path}: cannot read the model config: {exc}") from exc
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def rebuild_vae(
    weights_path: Path,
    config_path: Path,
    read_weights: Callable[[Path], Mapping[str, torch.Tensor]] = read_state_dict,
) -> tuple[VAE, dict[str, Any]]:
    """The VAE (CPU, eval mode) and its config dict, from a weights file and its config JSON.

    The one rebuild path of the project. ``read_weights`` turns the weights file into a state
    dict; the default reads weights-only torch files, and the MLflow layer passes a reader that
    also understands safetensors (a format vae_core does not depend on). The weights must fit
    the config exactly (strict loading): a missing or extra tensor is an error, not a warning.
    """
    config = read_model_config(config_path)
    model = build_vae(config)
    state = read_weights(Path(weights_path))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{weights_path}: weights do not fit {config_path}: {exc}") from exc
    return model.eval(), config


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> VAE:
    """Rebuild a VAE from `model.pt` + `model_config.json` written by save_model."""
    model_dir = Path(model_dir)
    config_path = model_dir / MODEL_CONFIG_NAME
    weights_path = model_dir / MODEL_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: expected a saved model file here, found nothing")
    model, _ = rebuild_vae(weights_path, config_path)
    return model.to(device).eval()
