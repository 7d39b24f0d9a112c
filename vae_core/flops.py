"""How fast could it be: the machine's matmul rate (fp32, or another dtype such as bf16) and the
FLOPs a model's step costs.

Speed figures are quoted as a fraction of the matrix-product rate measured in the same run,
because CPUs differ by 2x between machines that run this project; FLOPs are counted by torch's
own FlopCounterMode (matrix products and convolutions), not by hand, so every model variant
is counted the same way.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_gflops(
    size: int = 4096,
    repeats: int = 3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> float:
    """The best of `repeats` timings of a size x size matrix product in `dtype`, in GFLOP/s."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of the matrix products and convolutions that fn() runs (forward and backward)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def training_flops_per_image(model: torch.nn.Module, loss_fn: Callable, batch: int = 64) -> float:
    """FLOPs of one training step (forward and backward) per image; loss_fn(model, x) -> loss."""
    x = torch.bernoulli(torch.full((batch, 1, 28, 28), 0.5, device=next(model.parameters()).device))

    def step() -> None:
        loss_fn(model, x).backward()

    flops = count_flops(step)
    model.zero_grad(set_to_none=True)
    return flops / batch
