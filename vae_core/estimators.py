"""The IWAE estimator of log p(x) (Burda et al. 2015), per example: the one implementation that
evaluation, the trainer's validation (train.objective iwae), the promotion gate and the served
model all call.

It sits below both `vae_core.training` and `vae_core.evaluation` so that the library's layers
point one way: evaluation may use training (to load a model), training never uses evaluation.

The noise is seeded per example, from (seed, index of the example in the test set): the
per-example estimate then does not depend on the batch size, the chunk size or the subset it
was evaluated in, and two models compared example by example (the promotion gate) see the same
standard-normal draws, which lowers the variance of their difference.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from vae_core.models.vae import IWAEScorer

__all__ = ["example_seed", "iwae_log_likelihood", "model_device"]


def model_device(model: nn.Module) -> torch.device:
    """Evaluation runs where the model's weights live."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def example_seed(seed: int, index: int) -> int:
    """The seed of one test example's importance samples, in [0, 2^32).

    torch's CPU generator keeps only 32 bits of a seed, so (seed, index) is folded into 32 bits:
    for a given seed every index below 2^32 gets its own value, and seeds less than about 4000
    apart share none for indices below 10^6.
    """
    return (int(seed) * 1_000_003 + int(index)) % (1 << 32)


def _default_max_rows(device: torch.device) -> int:
    # One decoded row of a 784-pixel model costs about 12 KB in flight (logits, targets, loss).
    return 1 << 18 if device.type == "cuda" else 1 << 14


# The CPU fast path's rows per decoder call: big enough for efficient matrix products, small
# enough that a chunk's buffers (about 5 KB a row for the default MLP) stay in cache.
FAST_MAX_ROWS = 1024
# bf16 products (AMX) pay for larger chunks: 2048 rows took 1.22 s where 1024 took 1.37 s
# (k=5000 on 200 images, two cores, the default MLP).
FAST_MAX_ROWS_BF16 = 2048


def iwae_log_likelihood(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    *,
    seed: int = 0,
    indices: np.ndarray | torch.Tensor | None = None,
    batch_size: int | None = None,
    max_rows: int | None = None,
    fast: bool = True,
    precision: str = "fp32",
) -> np.ndarray:
    """IWAE estimate of log p(x) per example, log (1/k) sum_i p(x, z_i) / q(z_i | x), float64.

    The project's only implementation of the importance-weighted bound: evaluation, the
    promotion gate, the tests and the GPU check all call this one. A lower bound on log p(x)
    in expectation that tightens as k grows (Burda et al. 2015); k=1 is a one-sample ELBO.
    `indices` are the examples' positions in the full test set (they seed the noise, see the
    module docstring); by default 0..len(x)-1. Examples go through in batches and the k samples
    through the decoder in chunks of at most `max_rows` rows, so k=5000 fits in memory; the
    log-weights are kept in float64 and reduced with logsumexp.

    On the CPU a model with a fast path (`model.iwae_scorer`, e.g. an MLP VAE with Bernoulli
    pixels) is evaluated by it, the batches shared among torch's threads with one thread each:
    the same estimator and the same noise, so the same figures up to float32 rounding (about
    1e-4 nats). `fast=False` forces the generic path (`model.log_weight_terms`).

    `precision` bf16 runs the matrix products in bf16 (fp32 or bf16, already resolved: see
    vae_core.training.precision); the log-probabilities, log-weights and log-sum-exp stay in
    float32/float64. The same importance samples either way, so the two compare image by image.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision: expected fp32 or bf16, found {precision!r}")
    if k < 1:
        raise ValueError(f"evaluate.iwae_k: expected an integer >= 1, found {k}")
    device = model_device(model)
    n = len(x)
    if indices is None:
        indices = np.arange(n, dtype=np.int64)
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) != n:
        raise ValueError(f"indices: expected {n} entries (one per example), found {len(indices)}")
    rows = max_rows or (FAST_MAX_ROWS_BF16 if precision == "bf16" else FAST_MAX_ROWS)
    scorer = _fast_scorer(model, device, rows, precision) if fast else None
    if scorer is not None:
        return _iwae_fast(model, scorer, x, k, indices, seed, batch_size, rows, precision)
    max_rows = max_rows or _default_max_rows(device)
    if batch_size is None:
        batch_size = max(1, min(n, max_rows // k if k < max_rows else 1, 1000))
    gen = torch.Generator(device=device)
    out = np.empty(n, dtype=np.float64)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16"
        else contextlib.nullcontext()
    )
    with torch.inference_mode(), autocast:
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size].to(device)
            out[start : start + len(xb)] = (
                _iwae_batch(model, xb, k, indices[start : start + len(xb)], seed, gen, max_rows)
                .cpu()
                .numpy()
            )
    return out


def _example_noise(
    eps: torch.Tensor, indices: np.ndarray, seed: int, gen: torch.Generator
) -> torch.Tensor:
    """Fill eps (B, k, D) with each example's own standard-normal draws (see example_seed)."""
    k, dim = eps.shape[1:]
    for row, index in enumerate(indices):
        gen.manual_seed(example_seed(seed, int(index)))
        torch.randn(k, dim, generator=gen, device=eps.device, out=eps[row])
    return eps


def _iwae_batch(
    model: nn.Module,
    x: torch.Tensor,
    k: int,
    indices: np.ndarray,
    seed: int,
    gen: torch.Generator,
    max_rows: int,
) -> torch.Tensor:
    batch, dim = len(x), model.noise_dim
    # Per-example noise from per-example seeds: independent of batching and chunking.
    eps = _example_noise(torch.empty(batch, k, dim, device=x.device), indices, seed, gen)
    log_w = torch.empty(batch, k, dtype=torch.float64, device=x.device)
    chunk = max(1, max_rows // batch)
    for s in range(0, k, chunk):
        e = eps[:, s : s + chunk]  # (B, c, D)
        log_px_z, log_prior_minus_q = model.log_weight_terms(x, e)
        log_w[:, s : s + e.shape[1]] = log_px_z.double() + log_prior_minus_q.double()
    return torch.logsumexp(log_w, dim=1) - math.log(k)


def _fast_scorer(
    model: nn.Module, device: torch.device, max_rows: int, precision: str = "fp32"
) -> IWAEScorer | None:
    """The model's IWAE fast path (a fresh IWAEScorer) or None: CPU only (on a GPU the generic
    path is fast enough, and TF32 matrix products would not keep the float64 sums exact)."""
    if device.type != "cpu" or not hasattr(model, "iwae_scorer"):
        return None
    return model.iwae_scorer(max_rows, precision)


# Images per batch of the fast path at most: the batch's noise, (B, k, noise_dim) float32, is
# kept under this many numbers (16 MB) per thread.
FAST_NOISE_BUDGET = 1 << 22
# The per-example figures should not depend on which other examples share a batch or a chunk
# (a subset's figures equal the full set's, to the last bit where possible). MKL computes a
# row of a matrix product the same way wherever it sits in a product of at least 4 rows
# (float32) or of a multiple of 4 rows (float64, the per-image vectors of `prepare`), but not
# in smaller products; and torch's elementwise exp/sigmoid/tanh round the elements past the
# last whole vector of a tensor differently (see Scratch.padded). So a chunk has at least
# MIN_ROWS rows, and `prepare` sees a multiple of PREPARE_ROWS images (a multiple of 4 and of
# whole vectors for any width), the real ones followed by copies of the last, unused.
MIN_ROWS = 4
PREPARE_ROWS = 64


def _padded(x: torch.Tensor, rows: int) -> torch.Tensor:
    """x (B, ...) followed by copies of its last row, to a multiple of PREPARE_ROWS rows."""
    rows = -(-max(rows, len(x)) // PREPARE_ROWS) * PREPARE_ROWS
    return torch.cat([x, x[-1:].expand(rows - len(x), *x.shape[1:])])


def _iwae_fast(
    model: nn.Module,
    first_scorer: IWAEScorer,
    x: torch.Tensor,
    k: int,
    indices: np.ndarray,
    seed: int,
    batch_size: int | None,
    max_rows: int,
    precision: str = "fp32",
) -> np.ndarray:
    """The fast path: batches of examples shared among `torch.get_num_threads()` workers, each
    running torch with one thread (no synchronisation between the cores within a batch, which
    also keeps a machine shared with other jobs from stalling every small operation).

    A batch (its noise, and the per-image work of `scorer.prepare`) holds several images when
    their noise fits FAST_NOISE_BUDGET, with at least 4 batches per worker; its log-weights go
    through the decoder in chunks of at most `max_rows` rows: whole images when k <= max_rows,
    else balanced pieces of one image's samples.
    """
    n, dim = len(x), model.noise_dim
    threads = max(1, torch.get_num_threads())
    if batch_size is None:
        batch_size = min(1000, FAST_NOISE_BUDGET // (k * dim), -(-n // (4 * threads)))
        batch_size = max(1, batch_size)
    starts = list(range(0, n, batch_size))
    threads = min(threads, len(starts))
    per_chunk = max(1, max_rows // k)  # images per chunk, or else one image in pieces:
    pieces = -(-k // max_rows)
    samples = -(-k // pieces)  # balanced pieces of at most max_rows samples
    out = np.empty(n, dtype=np.float64)
    local = threading.local()
    scorers = [first_scorer]

    def run(start: int) -> None:
        if not hasattr(local, "scorer"):  # each worker thread: its own buffers and generator
            local.scorer = scorers.pop() if scorers else model.iwae_scorer(max_rows, precision)
            local.gen, local.eps = torch.Generator(), None
        xb = x[start : start + batch_size]
        batch = len(xb)
        with torch.inference_mode():
            if local.eps is None or local.eps.shape != (batch, k, dim):
                local.eps = torch.empty(batch, k, dim)
            eps = _example_noise(local.eps, indices[start : start + batch], seed, local.gen)
            scorer = local.scorer
            scorer.prepare(_padded(xb, batch + MIN_ROWS))
            log_w = torch.empty(batch, k, dtype=torch.float64)
            for i in range(0, batch, per_chunk):
                end = min(i + per_chunk, batch)
                for s in range(0, k, samples):
                    e = eps[i:end, s : s + samples]
                    if e.shape[0] * e.shape[1] < MIN_ROWS:  # repeat the last image's rows
                        more = -(-MIN_ROWS // e.shape[1]) - e.shape[0]
                        e = torch.cat([e, e[-1:].expand(more, -1, -1)])
                    lw = scorer.log_weights(e, slice(i, i + len(e)))
                    log_w[i:end, s : s + samples] = lw[: end - i]
            out[start : start + batch] = (torch.logsumexp(log_w, dim=1) - math.log(k)).numpy()

    if threads == 1:
        for start in starts:
            run(start)
        return out
    previous = torch.get_num_threads()
    pool = ThreadPoolExecutor(threads, initializer=torch.set_num_threads, initargs=(1,))
    try:
        for future in [pool.submit(run, start) for start in starts]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on an error, start no further batch
        torch.set_num_threads(previous)  # the workers' setting is process-wide in part
    return out
