"""Learning-rate schedules: Burda's stages and the exponential decay, as pure functions."""

import pytest

from vae_core.config import TrainConfig
from vae_core.training.schedule import BURDA_EPOCHS, burda_stage, lr_at


def test_burdas_schedule_has_3_to_the_i_epochs_in_stage_i_and_his_rates():
    stages = [burda_stage(e) for e in range(BURDA_EPOCHS)]
    assert BURDA_EPOCHS == 3280
    assert [stages.count(i) for i in range(8)] == [3**i for i in range(8)]
    assert stages == sorted(stages)  # stages follow each other, never come back
    assert burda_stage(BURDA_EPOCHS + 100) == 7  # past the end: the last stage's rate
    cfg = TrainConfig(lr=1e-3, lr_schedule="burda")
    assert lr_at(0, cfg) == pytest.approx(1e-3)
    assert lr_at(1, cfg) == pytest.approx(1e-3 * 10 ** (-1 / 7))  # epochs 1-3: stage 1
    assert lr_at(4, cfg) == pytest.approx(1e-3 * 10 ** (-2 / 7))
    assert lr_at(3279, cfg) == pytest.approx(1e-4)  # 10^(-7/7): Burda's last rate
    assert lr_at(0, cfg, budget_spent=0.9) == pytest.approx(1e-3)  # a budget moves no stage


def test_exponential_decay_goes_from_lr_to_lr_times_lr_final_and_constant_stays():
    cfg = TrainConfig(lr=2e-3, lr_schedule="exponential", lr_final=0.05, epochs=11)
    rates = [lr_at(e, cfg) for e in range(11)]
    assert rates[0] == pytest.approx(2e-3) and rates[-1] == pytest.approx(1e-4)
    ratios = [b / a for a, b in zip(rates, rates[1:], strict=False)]
    assert ratios == pytest.approx([0.05**0.1] * 10)  # geometric
    assert lr_at(50, cfg) == pytest.approx(1e-4)  # resumed past the end: stays at the floor
    cfg = TrainConfig(lr=3e-4, lr_schedule="constant")
    assert {lr_at(e, cfg) for e in (0, 7, 900)} == {3e-4}


def test_a_spent_time_budget_moves_the_exponential_decay_forward_but_never_back():
    cfg = TrainConfig(lr=1e-3, lr_schedule="exponential", lr_final=0.1, epochs=101)
    assert lr_at(10, cfg, budget_spent=0.5) == pytest.approx(1e-3 * 0.1**0.5)
    assert lr_at(80, cfg, budget_spent=0.5) == pytest.approx(1e-3 * 0.1**0.8)  # epochs lead
    assert lr_at(10, cfg, budget_spent=3.0) == pytest.approx(1e-4)  # over budget: the floor
