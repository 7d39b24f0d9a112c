"""Which device and how many torch threads a trial gets, on whatever host it runs."""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlparse

from flows.sweep.trials import _digest


def host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _dask_worker() -> Any | None:
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def parallel_trials_here(slots: Mapping[str, Any]) -> int:
    """How many trials run at once on this host: Dask threads on this host for a remote
    cluster (measured by the flow from the scheduler), else the runner's width."""
    default = max(1, int(slots.get("default", 1)))
    worker = _dask_worker()
    if worker is not None:
        host = urlparse(str(worker.address)).hostname or ""
        return max(1, int(slots.get("hosts", {}).get(host, default)))
    return default


_GPU_POOL: queue.Queue | None = None
_GPU_POOL_LOCK = threading.Lock()


def _gpu_pool(n: int) -> queue.Queue:
    global _GPU_POOL
    with _GPU_POOL_LOCK:
        if _GPU_POOL is None:
            _GPU_POOL = queue.Queue()
            for i in range(n):
                _GPU_POOL.put(i)
        return _GPU_POOL


@contextlib.contextmanager
def claim_device(requested: str, slots: Mapping[str, Any]) -> Iterator[tuple[str, int]]:
    """Yield (device, torch threads) for one trial.

    A device named in params (not ``auto``) is used as is. With CUDA, one trial per GPU: a
    Dask worker named ``i`` (LocalCluster names them 0..N-1) takes ``cuda:{i % n}``; threads in
    one process take a free GPU from a pool and give it back afterwards. On a CPU the host's
    cores are split between the trials that run on it at once.
    """
    import torch

    cuda = torch.cuda.device_count() if requested in ("auto", "cuda") else 0
    if cuda:
        worker = _dask_worker()
        name = getattr(worker, "name", None)
        if worker is not None:
            index = name if isinstance(name, int) else int(_digest(str(name)), 16)
            yield f"cuda:{index % cuda}", torch.get_num_threads()
            return
        pool = _gpu_pool(cuda)
        gpu = pool.get()
        try:
            yield f"cuda:{gpu}", torch.get_num_threads()
        finally:
            pool.put(gpu)
        return
    if requested == "auto":
        mps = getattr(torch.backends, "mps", None)
        requested = "mps" if mps is not None and mps.is_available() else "cpu"
    threads = torch.get_num_threads()
    if requested == "cpu":
        threads = max(1, host_cores() // parallel_trials_here(slots))
        torch.set_num_threads(threads)
    yield requested, threads
