"""The benchmark's rates: the warm-up epoch is left out, and the peak is measured per dtype."""

import torch

from experiments.bench import samples_per_second_after_warmup
from vae_core.flops import matmul_gflops


def test_samples_per_second_leave_out_the_first_epoch_unless_it_is_the_only_one() -> None:
    assert samples_per_second_after_warmup(1000, [5.0, 1.0, 3.0]) == 500.0  # 2,000 in 4 s
    assert samples_per_second_after_warmup(1000, [4.0]) == 250.0


def test_the_matmul_rate_is_measured_in_the_dtype_asked_for() -> None:
    assert matmul_gflops(64, repeats=1, dtype=torch.bfloat16) > 0
