"""Checkpoints: everything needed to resume a run bit for bit, saved atomically.

Files hold only tensors, numbers, strings and containers of them, so they load with
`torch.load(..., weights_only=True)` and never unpickle arbitrary objects.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_NAME = "last.pt"
BEST_WEIGHTS_NAME = "best.pt"
MODEL_WEIGHTS_NAME = "model.pt"
MODEL_CONFIG_NAME = "model_config.json"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary sibling, then rename: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Load a checkpoint saved by the trainer, without unpickling code."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def save_model(model: torch.nn.Module, config: dict, out_dir: Path) -> Path:
    """Write weights (weights-only torch file) and the model config (JSON) side by side."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out_dir / MODEL_WEIGHTS_NAME)
    atomic_write_text(out_dir / MODEL_CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return out_dir / MODEL_WEIGHTS_NAME


def load_model(model_dir: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild a VAE from `model.pt` + `model_config.json` written by save_model."""
    from vae_core.models.vae import build_vae

    model_dir = Path(model_dir)
    config_path = model_dir / MODEL_CONFIG_NAME
    weights_path = model_dir / MODEL_WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: expected a saved model file here, found nothing")
    model = build_vae(json.loads(config_path.read_text()))
    model.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    return model.to(device).eval()
