"""`python3 -m experiments recipe-search`: which batch size, precision and learning rate train
best in a fixed time, judged on the validation split (never the test set).

Each candidate trains the same model from the same initial weights for the same wall time
(train.max_minutes), its learning rate decaying exponentially to the end of that time, and is
scored by its best validation -ELBO (nats per image, one sample: a bound, not a likelihood).
The winner per hardware class is what `vae_core.training.recipe.BUDGET_RECIPES` holds; this
command is how those entries were chosen, and how to choose them again on other hardware.
Prints `name value` lines, one block per candidate, then the winner.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vae_core.config import TrainConfig, VAEConfig


@dataclass(frozen=True)
class Candidate:
    batch_size: int
    matmul_precision: str  # fp32 | bf16
    lr: float

    @property
    def label(self) -> str:
        return f"batch{self.batch_size}_{self.matmul_precision}_lr{self.lr:.4g}"


def candidates(
    batches: Sequence[int], precisions: Sequence[str], lr_exponents: Sequence[float], lr: float
) -> list[Candidate]:
    """Every batch size in every precision with lr * (batch / 128) ** exponent for each
    exponent (0.5: the square-root rule for Adam, 1.0: the linear rule)."""
    out: list[Candidate] = []
    for batch in batches:
        for precision in precisions:
            rates = dict.fromkeys(round(lr * (batch / 128) ** e, 6) for e in lr_exponents)
            out += [Candidate(batch, precision, min(rate, 1.0)) for rate in rates]
    return out


def search(
    mnist_dir: Path,
    seconds: float,
    pool: Sequence[Candidate],
    *,
    data_variant: str = "binarized",
    device: str = "auto",
    val_size: int = 1000,
    seed: int = 0,
    emit: Callable[[str, object], None] = lambda name, value: None,
) -> dict:
    """Train each candidate for `seconds` and return the winner by best validation -ELBO,
    with every candidate's figures passed to `emit` as they come."""
    from vae_core.data import load_splits
    from vae_core.models.factory import build_vae
    from vae_core.training.trainer import Trainer

    splits = load_splits(str(mnist_dir), "mnist", val_size=val_size, split_seed=seed)
    emit("train_images", len(splits.train_images))
    emit("val_images", len(splits.val_images))
    emit("seconds_per_candidate", seconds)
    scores: dict[Candidate, float] = {}
    for candidate in pool:
        config = dataclasses.replace(
            TrainConfig(),
            data_variant=data_variant,
            epochs=100_000,  # the time limit ends every candidate; the decay follows the time
            batch_size=candidate.batch_size,
            lr=candidate.lr,
            matmul_precision=candidate.matmul_precision,
            max_minutes=seconds / 60.0,
            patience=0,
            device=device,
            seed=seed,
        )
        trainer = Trainer(build_vae(VAEConfig(), seed=seed), config, progress=False)
        result = trainer.fit(splits.train_images, splits.val_images)
        scores[candidate] = result.best_val_neg_elbo
        emit(f"{candidate.label}_epochs", result.epochs_completed)
        emit(f"{candidate.label}_images_per_second", result.train_samples_per_second)
        emit(f"{candidate.label}_best_val_neg_elbo", result.best_val_neg_elbo)
    best = min(scores, key=scores.__getitem__)
    emit("winner", best.label)
    emit("winner_best_val_neg_elbo", scores[best])
    return {"winner": best, "scores": scores}
