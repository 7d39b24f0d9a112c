"""Train a VAE on prepared splits and write the model, the history and metrics.json.

This is the one training entry point: `vae-pipeline train`, the Prefect flow and the
benchmark all call it, so they cannot drift apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from vae_core.models.vae import VAEConfig, build_vae
from vae_core.objectives import dataset_elbo
from vae_core.training.checkpoint import atomic_write_text, save_model
from vae_core.training.config import TrainConfig
from vae_core.training.trainer import EpochCallback, Trainer, to_unit_float

VARIANT_LABELS = {
    "binarized": "binarized (dynamic binarization in training; fixed binarized test set)",
    "continuous": "continuous grey levels in [0, 1]",
}


class Splits(Protocol):
    train_images: torch.Tensor
    val_images: torch.Tensor
    test_images: torch.Tensor
    test_binarized: torch.Tensor


def test_inputs(splits: Splits, data_variant: str) -> torch.Tensor:
    """The test set in the variant the model was trained on, as floats (N, 1, 28, 28)."""
    if data_variant == "binarized":
        return to_unit_float(splits.test_binarized.float())
    return to_unit_float(splits.test_images)


def estimator_label(likelihood: str, data_variant: str) -> str:
    """Say what the test -ELBO figure is, so nobody mistakes a summed BCE for a likelihood."""
    if data_variant == "continuous" and likelihood == "bernoulli":
        return "ELBO (1 sample) with a summed BCE on grey levels: not a likelihood bound"
    return "ELBO (1 sample): a lower bound on the log-likelihood"


def run_training(
    splits: Splits,
    model_config: VAEConfig | dict,
    train_config: TrainConfig | dict,
    out_dir: Path,
    callbacks: list[EpochCallback] | None = None,
    resume: bool = True,
) -> dict:
    """Train, keep the best weights, score the test set and write out_dir/metrics.json.

    Layout: out_dir/checkpoints/{last,best}.pt, out_dir/model/{model.pt,model_config.json},
    out_dir/history.json, out_dir/metrics.json.
    """
    out_dir = Path(out_dir)
    if isinstance(train_config, dict):
        train_config = TrainConfig.from_dict(train_config)
    torch.manual_seed(train_config.seed)  # the initial weights too: same seed, same model
    model = build_vae(model_config)
    trainer = Trainer(model, train_config)
    result = trainer.fit(
        splits.train_images,
        splits.val_images,
        checkpoint_dir=out_dir / "checkpoints",
        callbacks=callbacks,
        resume=resume,
    )
    model = trainer.model
    x_test = test_inputs(splits, train_config.data_variant).to(trainer.device)
    gen = torch.Generator(device=trainer.device).manual_seed(train_config.seed + 4)
    test = dataset_elbo(model, x_test, train_config.eval_batch_size, gen)
    likelihood = model.config.likelihood
    metrics = {
        "test_neg_elbo": float(-test.elbo.mean()),
        "test_recon": float(-test.log_px_z.mean()),
        "test_kl": float(test.kl.mean()),
        "test_neg_elbo_data_variant": VARIANT_LABELS[train_config.data_variant],
        "test_neg_elbo_estimator": estimator_label(likelihood, train_config.data_variant),
        "test_neg_elbo_unit": "nats per image",
        "test_size": len(x_test),
        "best_val_neg_elbo": result.best_val_neg_elbo,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_completed,
        "stopped_early": result.stopped_early,
        "resumed_from_epoch": result.resumed_from_epoch,
        "train_samples_per_second": result.train_samples_per_second,
        "device": result.device,
        "likelihood": likelihood,
        "data_variant": train_config.data_variant,
        "train_size": len(splits.train_images),
        "torch_version": torch.__version__,
    }
    save_model(
        model,
        model.config.to_dict() | {"data_variant": train_config.data_variant},
        out_dir / "model",
    )
    atomic_write_text(out_dir / "history.json", json.dumps(result.history, indent=2) + "\n")
    atomic_write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    return metrics
