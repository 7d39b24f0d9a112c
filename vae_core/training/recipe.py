"""The training recipe (train.recipe): `fixed` trains with train.batch_size, train.lr and
train.matmul_precision as set; `budget` is for a run with a time limit (train.max_minutes) and
picks what trains best in that time on this hardware: the batch size where its matrix units
pay, bf16 where they are fast, and the learning rate scaled to that batch from train.lr (the
rate at batch 128), decaying exponentially to train.lr * train.lr_final at the end of the time.

The CPU entries of BUDGET_RECIPES were chosen on the validation split, never the test set, by
`python3 -m experiments recipe-search` (each candidate trained for the same wall time from the
same weights; the figures are in the comments). Run it again on hardware not listed here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from vae_core.config import ConfigError, TrainConfig
from vae_core.training.precision import fast_bf16

#: train.lr is the learning rate at this batch size; a recipe scales it to its own.
REFERENCE_BATCH = 128


@dataclass(frozen=True)
class BudgetRecipe:
    batch_size: int
    matmul_precision: str  # fp32 | bf16
    lr_exponent: float  # lr = train.lr * (batch_size / REFERENCE_BATCH) ** lr_exponent


#: Per kind of hardware (`hardware_kind`).
BUDGET_RECIPES: dict[str, BudgetRecipe | None] = {
    # `recipe-search --mnist-dir <full MNIST> --seconds 45` (binarized, train.lr 2e-3), Xeon
    # with AMX, 2 cores; best validation -ELBO: bf16 batch 512 lr 4e-3 99.91 (58.7k images/s),
    # batch 256 lr 4e-3 99.97, batch 1024 lr 5.7e-3 100.8, batch 2048 lr 8e-3 108.0; linear
    # scaling diverged at 1024 and 2048 (139.6, 184.8); fp32 batch 128 lr 2e-3 100.8 (26k/s)
    "cpu-bf16": BudgetRecipe(512, "bf16", 0.5),
    # One seed, 1,000 validation images, the default MLP with the ELBO: 512 vs 256 is within
    # noise; nothing was searched for the IWAE or two-layer models, which reuse this entry.
    # No bf16 matrix units (an AMD box has been seen): the same AMX box searched in fp32 kept
    # batch 128 (100.8 against 101.4 for batch 512 at lr 4e-3, though 512 ran 42k images/s to
    # 26k); not measured on a machine without AMX.
    "cpu": BudgetRecipe(128, "fp32", 0.5),
    # CUDA: not measured yet (no GPU has been lent); a batch large enough to keep it busy
    "cuda-bf16": BudgetRecipe(1024, "bf16", 0.5),
    "cuda": BudgetRecipe(1024, "fp32", 0.5),
    "other": None,  # mps and the rest: nothing measured, so the settings as set
}


def hardware_kind(device: torch.device) -> str:
    """The key of BUDGET_RECIPES for `device`."""
    if device.type not in ("cpu", "cuda"):
        return "other"
    has_bf16, _ = fast_bf16(device)
    return f"{device.type}-bf16" if has_bf16 else device.type


def apply_recipe(config: TrainConfig, device: torch.device) -> tuple[TrainConfig, str]:
    """The settings a run trains with under train.recipe, and the decision in words. They
    are fixed ones (recipe: fixed), so applying them again changes nothing."""
    if config.recipe == "fixed":
        return config, "fixed: train.batch_size, train.lr and train.matmul_precision as set"
    if not config.max_minutes:
        raise ConfigError(
            "train.recipe: 'budget' picks what trains best in a time limit, so it needs "
            f"train.max_minutes > 0, found {config.max_minutes}"
        )
    kind = hardware_kind(device)
    recipe = BUDGET_RECIPES[kind]
    if recipe is None:
        as_set = dataclasses.replace(config, recipe="fixed")
        return as_set, f"budget ({kind}): no recipe measured for {device.type}, so as set"
    lr = min(1.0, config.lr * (recipe.batch_size / REFERENCE_BATCH) ** recipe.lr_exponent)
    chosen = dataclasses.replace(
        config,
        batch_size=recipe.batch_size,
        lr=round(lr, 8),
        matmul_precision=recipe.matmul_precision,
        # Burda's schedule for a run long enough for it (reproduce's rows given 3,280 epochs)
        lr_schedule="burda" if config.lr_schedule == "burda" else "exponential",
        recipe="fixed",
    )
    reason = (
        f"budget ({kind}): batch {recipe.batch_size}, {recipe.matmul_precision}, lr "
        f"{chosen.lr:.3g} = train.lr x ({recipe.batch_size}/{REFERENCE_BATCH})^"
        f"{recipe.lr_exponent:g}, decaying to x{config.lr_final:g} by the end of "
        f"{config.max_minutes:g} min"
    )
    return chosen, reason
