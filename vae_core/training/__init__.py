"""The trainer: device placement, checkpoints, resume, callbacks."""

from vae_core.config import TrainConfig
from vae_core.training.checkpoint import load_checkpoint, load_model, save_model
from vae_core.training.device import pick_device
from vae_core.training.run import initial_model, run_training
from vae_core.training.trainer import (
    EVAL_BATCH_SIZE,
    NonFiniteLossError,
    Trainer,
    TrainResult,
    to_unit_float,
)

__all__ = [
    "EVAL_BATCH_SIZE",
    "NonFiniteLossError",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_checkpoint",
    "load_model",
    "pick_device",
    "initial_model",
    "run_training",
    "save_model",
    "to_unit_float",
]
