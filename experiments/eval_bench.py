"""Time the IWAE evaluation of the default MLP VAE (784-400-20), one `name value` per line.

    python3 -m experiments eval-bench                       # embedded test set, CPU or GPU
    python3 -m experiments eval-bench --mnist-dir ../shared/data/mnist --train-epochs 10
    python3 -m experiments eval-bench --throughput --preset burda1 --k 5000 --images 200

Runs each of --ks (default k=100 and k=1000) on --test-size test images (default the first
1,000 of a seeded permutation), and k=5000 on the whole test set only when CUDA is present.
With --train-epochs N the model is first trained (dynamically binarized, the library's
trainer) so the printed NLLs mean something; without it the weights are random and only the
timings are meaningful. The IWAE cost does not depend on the weights.

--throughput is a separate mode: it measures this machine's fp32 matrix-product rate (a large
square matmul, best of a few, before and after), then times one IWAE evaluation of a model
preset (random weights) with --k samples on --images test images, and prints the rate of the
model's useful work: the FLOPs of its matrix products (the encoder once per image, everything
that runs per importance sample once per sample) per second, and that rate as a fraction of
the matmul rate measured in the same run. Both rates share the machine with whatever else
runs on it, so compare fractions from one run rather than rates from different runs.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vae_core.config import BURDA_ONE_LAYER, BURDA_TWO_LAYER
from vae_core.evaluation.likelihood import elbo_summary, iwae_log_likelihood, iwae_nll
from vae_core.models.factory import build_vae
from vae_core.models.vae import VAE, VAEConfig
from vae_core.training import TrainConfig, Trainer, load_model, pick_device
from vae_core.training.run import split_inputs


def _splits(mnist_dir: Path | None):
    from vae_core.data import load_raw, load_splits, make_splits

    if mnist_dir is None:
        return "embedded", load_splits("embedded", "mnist", val_size=500)
    arrays = load_raw(mnist_dir)
    val_size = min(5000, len(arrays[0]) // 10)  # 5,000 of MNIST's 60,000; less of a tiny set
    splits, _ = make_splits(*arrays, val_size=val_size, split_seed=0, binarize_seed=0)
    return "full_mnist", splits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_iwae(
    model,
    x,
    k: int,
    test_size: int,
    seed: int,
    device: torch.device,
    label: str,
    precision: str = "fp32",
):
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = iwae_nll(model, x, k, test_size=test_size, seed=seed, precision=precision)
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    n = len(result.indices)
    print(f"{label}_k {k}")
    print(f"{label}_test_size {n}")
    print(f"{label}_seconds {seconds:.3f}")
    # Process CPU time over all threads: on a shared machine wall time also counts waiting.
    print(f"{label}_cpu_seconds {cpu_seconds:.3f}")
    print(f"{label}_images_per_second {n / seconds:.1f}")
    print(f"{label}_decoder_passes_per_second {n * k / seconds:.0f}")
    print(f"{label}_nll_iwae {result.mean:.3f}")
    print(f"{label}_nll_iwae_stderr {result.stderr:.3f}")
    return result, seconds


def _compare_precisions(label: str, results: dict[str, tuple]) -> None:
    """bf16 against fp32 on the same images with the same importance samples: the mean
    per-image difference of the NLL (bf16 - fp32) with its standard error, the largest one,
    and the speed-up."""
    (fp32, fp32_s), (bf16, bf16_s) = results["fp32"], results["bf16"]
    diff = bf16.nll - fp32.nll
    print(f"{label}_bf16_minus_fp32_mean_nats {diff.mean():.4f}")
    print(f"{label}_bf16_minus_fp32_stderr_nats {diff.std(ddof=1) / np.sqrt(len(diff)):.4f}")
    print(f"{label}_bf16_minus_fp32_max_abs_nats {np.abs(diff).max():.4f}")
    print(f"{label}_bf16_speedup {fp32_s / bf16_s:.2f}")


PRESETS = {
    "mlp": VAEConfig(),
    "burda1": BURDA_ONE_LAYER,
    "burda2": BURDA_TWO_LAYER,
}


@functools.cache
def _matmul_operands(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen) for _ in range(2))
    return a, b, torch.empty(size, size)


def _matmul_gflops(size: int, repeats: int) -> float:
    """Best-of-`repeats` rate of a (size x size) @ (size x size) fp32 product, GFLOP/s."""
    a, b, out = _matmul_operands(size)
    torch.mm(a, b, out=out)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * size**3 / best / 1e9


def _linear_flops(*modules: nn.Module) -> int:
    """FLOPs of one input's pass through every nn.Linear of the modules (2 * in * out each)."""
    return sum(
        2 * m.in_features * m.out_features
        for module in modules
        for m in module.modules()
        if isinstance(m, nn.Linear)
    )


def _flops_per_image_and_sample(model: nn.Module) -> tuple[int, int]:
    if hasattr(model, "q_z1"):  # two stochastic layers: only q(z1|x) runs once per image
        return _linear_flops(model.q_z1), _linear_flops(model.q_z2, model.p_z1, model.p_x)
    return _linear_flops(model.encoder), _linear_flops(model.decoder)


def _test_images(data: str, n: int, seed: int) -> tuple[str, torch.Tensor]:
    """n test images (N, 1, 28, 28) in {0, 1}: the embedded test set (cycled past its 1,000
    images) or random binary images; the IWAE cost does not depend on the pixel values."""
    if data == "embedded":
        try:
            from vae_core.data import load_splits

            splits = load_splits("embedded", "mnist", val_size=500)
            x = split_inputs(splits, "test", "binarized")
            return "embedded", x[torch.arange(n) % len(x)].contiguous()
        except Exception as exc:  # noqa: BLE001 - fall back to random images, say so
            print(f"embedded_data_unavailable {type(exc).__name__}")
    gen = torch.Generator().manual_seed(seed)
    return "random_binary", torch.bernoulli(torch.full((n, 1, 28, 28), 0.13), generator=gen)


def _matmul_gflops_per_core(size: int, repeats: int) -> float:
    """Best-of-`repeats` rate of the fp32 product on one thread, per second of CPU time: what
    one core does while it runs, however busy the machine (time sliced away does not count)."""
    threads = torch.get_num_threads()
    a, b, out = _matmul_operands(size)
    try:
        torch.set_num_threads(1)
        torch.mm(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            c0 = time.thread_time()
            torch.mm(a, b, out=out)
            best = min(best, time.thread_time() - c0)
    finally:
        torch.set_num_threads(threads)
    return 2.0 * size**3 / best / 1e9


def throughput(args: argparse.Namespace) -> int:
    """The --throughput mode: matmul rate, then one timed IWAE evaluation of a preset.

    The images go through in --segments calls (each example's estimate does not depend on the
    grouping), each preceded by a matmul measurement: on a machine shared with other jobs the
    share of the cores this process gets changes by the second, so besides the whole run's
    fraction (total time against the best matmul) the script prints the median of each
    segment's rate over its neighbouring matmul rate, and a CPU-time fraction (FLOPs per CPU
    second of this process against one thread's matmul FLOPs per CPU second) that time sliced
    away to other processes does not change.
    """
    print("mode throughput")
    print(f"torch_threads {torch.get_num_threads()}")
    print(f"preset {args.preset}")
    model = build_vae(PRESETS[args.preset], seed=args.seed).eval()
    per_image, per_sample = _flops_per_image_and_sample(model)
    data_name, x = _test_images(args.data, args.images, args.seed)
    print(f"data {data_name}")
    fast = not args.generic and model.iwae_scorer(1) is not None
    print(f"fast_path {int(fast)}")
    n, k = len(x), args.k
    iwae_log_likelihood(model, x[:2], 8, seed=args.seed, fast=fast)  # warm-up
    load_before = os.getloadavg()[0]
    bounds = np.linspace(0, n, max(1, min(args.segments, n)) + 1).round().astype(int)
    matmuls, segment_rates, log_px = [], [], np.empty(n)
    seconds = cpu_seconds = 0.0
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        matmuls.append(_matmul_gflops(args.matmul_size, args.matmul_repeats))
        t0, c0 = time.perf_counter(), time.process_time()
        log_px[lo:hi] = iwae_log_likelihood(
            model, x[lo:hi], k, seed=args.seed, indices=np.arange(lo, hi), fast=fast
        )
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        seconds, cpu_seconds = seconds + wall, cpu_seconds + cpu
        segment_rates.append((hi - lo) * (per_image + k * per_sample) / wall / 1e9)
    matmuls.append(_matmul_gflops(args.matmul_size, args.matmul_repeats))
    load_after = os.getloadavg()[0]
    per_core = _matmul_gflops_per_core(args.matmul_size // 2, args.matmul_repeats)
    matmul = max(matmuls)
    flops = n * per_image + n * k * per_sample
    iwae_gflops = flops / seconds / 1e9
    paired = [rate / max(matmuls[i], matmuls[i + 1]) for i, rate in enumerate(segment_rates)]
    print(f"matmul_size {args.matmul_size}")
    print(f"matmul_gflops_runs {' '.join(f'{m:.1f}' for m in matmuls)}")
    print(f"matmul_gflops {matmul:.1f}")
    print(f"matmul_gflops_per_core_cpu_second {per_core:.1f}")
    print(f"k {k}")
    print(f"images {n}")
    print(f"segments {len(segment_rates)}")
    print(f"flops_per_image {per_image}")
    print(f"flops_per_sample {per_sample}")
    print(f"seconds {seconds:.3f}")
    print(f"cpu_seconds {cpu_seconds:.3f}")
    # Below torch_threads when other jobs share the cores (the matmul rate suffers too).
    print(f"cores_used {cpu_seconds / seconds:.2f}")
    print(f"loadavg_1min_before {load_before:.2f}")
    print(f"loadavg_1min_after {load_after:.2f}")
    print(f"samples_per_second {n * k / seconds:.0f}")
    print(f"iwae_gflops {iwae_gflops:.1f}")
    print(f"fraction_of_matmul {iwae_gflops / matmul:.3f}")
    print(f"fraction_of_matmul_paired_median {float(np.median(paired)):.3f}")
    print(f"fraction_of_matmul_cpu_time {flops / cpu_seconds / 1e9 / per_core:.3f}")
    full = 10_000 * per_image + 10_000 * 5000 * per_sample
    print(f"seconds_for_k5000_all_10000 {full / (iwae_gflops * 1e9):.0f}")
    print(f"mean_log_px {float(log_px.mean()):.3f}")
    return 0


def timings(args: argparse.Namespace) -> int:
    """The default mode: (train, then) time iwae_nll at each of --ks on --test-size images."""
    device = pick_device(args.device)
    data_name, splits = _splits(args.mnist_dir)
    print(f"device {device}")
    print(f"device_name {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"torch_threads {torch.get_num_threads()}")
    print(f"data {data_name}")
    print("model mlp_784_400_20_bernoulli")
    print("data_variant binarized")
    if args.model_dir is not None:
        model = load_model(args.model_dir, device)
        print(f"weights {args.model_dir}")
    else:
        torch.manual_seed(args.seed)
        model = VAE(VAEConfig())
        if args.train_epochs > 0:
            t0 = time.perf_counter()
            trainer = Trainer(
                model,
                TrainConfig(
                    epochs=args.train_epochs, patience=0, device=str(device), seed=args.seed
                ),
                progress=False,
            )
            trainer.fit(splits.train_images, splits.val_images)
            model = trainer.model
            print(f"train_epochs {args.train_epochs}")
            print(f"train_seconds {time.perf_counter() - t0:.1f}")
        print(f"weights {'trained' if args.train_epochs > 0 else 'random_init'}")
    model = model.to(device).eval()
    x = split_inputs(splits, "test", "binarized").to(device)

    elbo = elbo_summary(model, x, seed=args.seed)
    print(f"test_size_full {len(x)}")
    print(f"test_neg_elbo {elbo.neg_elbo:.3f}")
    print(f"test_recon {elbo.recon:.3f}")
    print(f"test_kl {elbo.kl:.3f}")
    precisions = args.precisions.split(",")
    for precision in precisions:
        iwae_nll(model, x[:8], 10, precision=precision)  # warm-up: allocator, kernels
    suffix = {p: f"_{p}" if len(precisions) > 1 else "" for p in precisions}
    runs = [(int(k), args.test_size) for k in args.ks.split(",")]
    runs += [(5000, 0)] if device.type == "cuda" or args.full else []
    for k, n in runs:
        label = f"iwae_k{k}_n{n}" if n else f"iwae_k{k}_full"
        results = {
            p: _time_iwae(model, x, k, n, args.seed, device, f"{label}{suffix[p]}", p)
            for p in precisions
        }
        if {"fp32", "bf16"} <= results.keys():
            _compare_precisions(label, results)
    return 0
