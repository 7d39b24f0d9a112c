"""Learning-rate schedules, as pure functions of the epoch (and, for a run with a time budget,
of the share of that budget spent, which checkpoints carry): a resumed run continues on the
same schedule."""

from __future__ import annotations

from vae_core.config import TrainConfig

#: Burda et al. (2015), section 5: "3^i epochs with learning rate 0.001 * 10^(-i/7), i = 0..7".
BURDA_STAGES = 8
BURDA_EPOCHS = sum(3**i for i in range(BURDA_STAGES))  # 3,280


def burda_stage(epoch: int) -> int:
    """The stage i of a (0-based) epoch in Burda's schedule; the last stage lasts for ever."""
    stage, end = 0, 1
    while epoch >= end and stage < BURDA_STAGES - 1:
        stage += 1
        end += 3**stage
    return stage


def lr_at(epoch: int, config: TrainConfig, budget_spent: float = 0.0) -> float:
    """The learning rate of a (0-based) epoch.

    constant: lr. exponential: from lr at the first epoch to lr * lr_final at the last
    (config.epochs), geometrically; with a time budget (train.max_minutes), at the share of the
    budget that will have been spent by the end of this epoch (`budget_spent`) if that is
    further along, so that a run the budget stops before its last epoch still ends at
    lr * lr_final instead of being cut off mid-decay. burda: lr * 10^(-i/7) for 3^i epochs,
    i = 0..7, whatever config.epochs is (fewer epochs stop early in the schedule).
    """
    if config.lr_schedule == "exponential":
        span = max(config.epochs - 1, 1)
        progress = max(min(epoch, span) / span, min(max(budget_spent, 0.0), 1.0))
        return config.lr * config.lr_final**progress
    if config.lr_schedule == "burda":
        return config.lr * 10 ** (-burda_stage(epoch) / 7)
    return config.lr
