"""The MLflow name of every figure the trainer reports, one table each: per epoch (logged with
step = epoch), the totals of a run, and its yes/no outcomes (tags). One name from where a figure
is computed to the MLflow chart: the pipeline (flows.run_record adds the evaluation's names) and
the experiments (reproduce's rows) both log through these. Standard library only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: Trainer history key -> MLflow metric key, logged with step = epoch.
EPOCH_METRICS = {
    "train_neg_elbo": "train/neg_elbo",
    "val_neg_elbo": "val/neg_elbo",
    "val_neg_iwae": "val/neg_iwae",  # iwae objective only: what chooses its weights
    "val_recon": "val/recon",
    "val_kl": "val/kl",
    "samples_per_second": "time/train_images_per_second",
    "epoch_seconds": "time/epoch_seconds",
    "lr": "schedule/lr",
    "beta": "schedule/kl_weight",
}
#: The objective actually minimised; logged only when it is not the -ELBO already logged.
#: (lr and beta likewise only when they change from epoch to epoch: `repeated_epoch_keys`.)
EPOCH_OBJECTIVE = ("train_loss", "train/loss")

#: Training totals -> MLflow metric key.
TRAIN_FIGURES = {
    "best_val_neg_elbo": "val/best_neg_elbo",
    "best_val_neg_iwae": "val/best_neg_iwae",
    "best_epoch": "train/best_epoch",
    "epochs": "train/epochs",
    "train_samples_per_second": "time/mean_train_images_per_second",
    "resumed_from_epoch": "train/resumed_from_epoch",
}

#: Training outcomes that are yes/no: tags `train.<flag>`, not metrics.
STOP_FLAGS = ("stopped_early", "stopped_by_time")


def stop_tags(train_metrics: Mapping[str, Any]) -> dict[str, str]:
    """Training's yes/no outcomes as tags `train.<flag>` ("true"/"false"), the precision the
    run used (`train.matmul_precision_used`: fp32 or bf16, from train.matmul_precision) and
    what train.recipe chose (`train.recipe_used`, `train.batch_size_used`, `train.lr_used`)."""
    tags = {f"train.{k}": str(bool(train_metrics[k])).lower() for k in STOP_FLAGS}
    if "matmul_precision" in train_metrics:  # what the matrix products ran in, and why
        tags["train.matmul_precision_used"] = str(train_metrics["matmul_precision"])
        reason = str(train_metrics.get("matmul_precision_reason", ""))
        tags["train.matmul_precision_reason"] = reason
    if train_metrics.get("recipe"):  # train.recipe's choice: batch size and lr as trained
        tags["train.recipe_used"] = str(train_metrics["recipe"])
        tags["train.batch_size_used"] = str(train_metrics["batch_size"])
        tags["train.lr_used"] = f"{float(train_metrics['lr']):.6g}"
    return tags


def epoch_figures(
    record: Mapping[str, Any], skip: frozenset[str] = frozenset()
) -> dict[str, float]:
    """One epoch's figures under their MLflow keys (the caller logs them at step = epoch),
    leaving out the history keys in `skip` (see `repeated_epoch_keys`)."""
    names = EPOCH_METRICS | {EPOCH_OBJECTIVE[0]: EPOCH_OBJECTIVE[1]}
    return {names[k]: float(v) for k, v in record.items() if k in names and k not in skip}


def training_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Training totals under their MLflow keys."""
    return {TRAIN_FIGURES[k]: float(v) for k, v in metrics.items() if k in TRAIN_FIGURES}


def repeated_epoch_keys(train: Any) -> frozenset[str]:
    """Trainer history keys that would only repeat something logged already: the loss when it
    is the -ELBO itself (ELBO objective, beta 1, no warm-up), the learning rate when the
    schedule is constant and the KL weight without warm-up (then they are the settings
    train.lr and train.beta, which are params)."""
    skip = set()
    if train.objective == "elbo" and train.beta == 1.0 and train.warmup_epochs == 0:
        skip.add(EPOCH_OBJECTIVE[0])
    if train.lr_schedule == "constant":
        skip.add("lr")
    if train.warmup_epochs == 0:
        skip.add("beta")
    return frozenset(skip)
