"""Train a VAE on prepared splits and write the model beside its checkpoints.

This is the one training entry point: `vae-pipeline train`, the Prefect flow and the sweep
trials all call it, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from vae_core.config import TrainConfig, VAEConfig
from vae_core.models.factory import build_vae
from vae_core.models.vae import VAE
from vae_core.training.checkpoint import save_model
from vae_core.training.trainer import EpochCallback, Trainer, to_unit_float

if TYPE_CHECKING:
    from vae_core.data.splits import DatasetSplits

VARIANT_LABELS = {
    "binarized": "binarized (dynamic binarization in training; fixed binarized test set)",
    "continuous": "continuous grey levels in [0, 1]",
}


def split_inputs(splits: DatasetSplits, split: str, data_variant: str) -> torch.Tensor:
    """The holdout or test set in the variant the model was trained on, as floats
    (N, 1, 28, 28): the fixed binarized copy, or the grey levels."""
    if data_variant == "binarized":
        return to_unit_float(getattr(splits, f"{split}_binarized").float())
    return to_unit_float(getattr(splits, f"{split}_images"))


@dataclass
class TrainOutcome:
    """What a training run produced: the best model (in eval mode, on its training device),
    the training figures, and one record per epoch."""

    model: VAE
    metrics: dict[str, float | int | str | bool]
    history: list[dict] = field(default_factory=list)


def initial_model(model_config: VAEConfig, train_config: TrainConfig) -> VAE:
    """The untrained network: same seed, same initial weights."""
    return build_vae(model_config, seed=train_config.seed)


def run_training(
    splits: DatasetSplits,
    model_config: VAEConfig,
    train_config: TrainConfig,
    out_dir: Path,
    callbacks: list[EpochCallback] | None = None,
    resume: bool = True,
    progress: bool = True,
    model: VAE | None = None,
) -> TrainOutcome:
    """Train and keep the best weights (by the validation -ELBO, or the -IWAE bound under the
    iwae objective); the test set is not touched here, evaluation reports it.

    Writes out_dir/checkpoints/{last,best}.pt (a rerun resumes from them) and
    out_dir/model/{model.pt,model_config.json}, the model evaluation and registration read.
    `model`: the network to train, from `initial_model` (a callback that draws from the model
    while it trains needs it before training starts); by default built here.
    """
    out_dir = Path(out_dir)
    if model is None:
        model = initial_model(model_config, train_config)
    trainer = Trainer(model, train_config, progress=progress)
    result = trainer.fit(
        splits.train_images,
        splits.val_images,
        checkpoint_dir=out_dir / "checkpoints",
        callbacks=callbacks,
        resume=resume,
    )
    model = trainer.model
    metrics = {
        "best_val_neg_elbo": result.best_val_neg_elbo,
        **(
            {"best_val_neg_iwae": result.best_val_neg_iwae}
            if result.best_val_neg_iwae is not None
            else {}
        ),
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_completed,
        "stopped_early": result.stopped_early,
        "stopped_by_time": result.stopped_by_time,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_samples_per_second": result.train_samples_per_second,
        "device": result.device,
        "matmul_precision": result.precision,
        "matmul_precision_reason": result.precision_reason,
        "recipe": result.recipe,
        "batch_size": result.batch_size,
        "lr": result.lr,
        "train_size": len(splits.train_images),
    }
    saved = model.config.to_dict() | {"data_variant": train_config.data_variant}
    save_model(model, saved, out_dir / "model")
    return TrainOutcome(model, metrics, result.history)
