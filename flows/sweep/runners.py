"""The Prefect task runners trials go through (sequential, threads, Dask) and the Prefect API
Dask workers report to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from flows.sweep.devices import host_cores
from flows.sweep.spec import SweepError

RUNNERS = ("sequential", "threads", "dask")


@dataclass
class RunnerChoice:
    """A Prefect task runner and what a trial needs to know to share its host's cores."""

    kind: str
    runner: Any
    slots: dict = field(default_factory=dict)
    description: str = ""


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except ImportError:
        return 0


def local_cluster_kwargs(n_workers: int) -> dict[str, Any]:
    """A single-machine Dask cluster: one single-threaded worker process per trial slot, all
    bound to 127.0.0.1."""
    return {
        "n_workers": n_workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }


def scheduler_hosts(address: str, timeout_s: float = 30) -> dict[str, int]:
    """Worker threads per host of a running Dask cluster (trials on one host share its cores)."""
    from distributed import Client

    with Client(address, timeout=f"{timeout_s}s") as client:
        workers = client.scheduler_info(n_workers=-1)["workers"]
    hosts: dict[str, int] = {}
    for addr, info in workers.items():
        host = info.get("host") or urlparse(addr).hostname or ""
        hosts[host] = hosts.get(host, 0) + int(info.get("nthreads", 1))
    return hosts


def make_task_runner(
    kind: str | None = None,
    *,
    max_workers: int | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
) -> RunnerChoice:
    """The Prefect task runner the trials go through.

    - ``sequential``: one trial at a time (a one-thread pool);
    - ``threads`` (default): ``max_workers`` trials at once in this process (default: one per
      GPU, else 1);
    - ``dask``: prefect-dask's DaskTaskRunner, on the scheduler at ``dask_address``, or on a
      new local cluster of ``dask_workers`` single-threaded worker processes (default: one
      per GPU, else cores // 2).
    """
    if kind is None:
        kind = "dask" if dask_address or dask_workers else "threads"
    if kind not in RUNNERS:
        raise SweepError(f"task runner {kind!r}: expected one of {', '.join(RUNNERS)}")
    if kind != "dask" and (dask_address or dask_workers):
        raise SweepError("--dask-address and --dask-workers need --task-runner dask")
    if dask_address and dask_workers:
        raise SweepError("--dask-workers sizes a local cluster; omit it with --dask-address")
    gpus = _gpu_count()
    if kind in ("sequential", "threads"):
        from prefect.task_runners import ThreadPoolTaskRunner

        width = 1 if kind == "sequential" else (max_workers or max(1, gpus))
        if width < 1:
            raise SweepError(f"--max-workers: expected an integer >= 1, found {width}")
        return RunnerChoice(
            kind,
            ThreadPoolTaskRunner(max_workers=width),
            {"default": width},
            f"{kind}: {width} trial(s) at a time in this process",
        )
    from prefect_dask import DaskTaskRunner

    if dask_address:
        hosts = scheduler_hosts(dask_address)
        if not hosts:
            raise SweepError(f"the Dask scheduler at {dask_address} has no workers")
        return RunnerChoice(
            kind,
            DaskTaskRunner(address=dask_address),
            {"default": 1, "hosts": hosts},
            f"dask: scheduler {dask_address}, worker threads per host {hosts}",
        )
    n = dask_workers or (gpus or max(1, host_cores() // 2))
    if n < 1:
        raise SweepError(f"--dask-workers: expected an integer >= 1, found {n}")
    return RunnerChoice(
        kind,
        DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(n)),
        {"default": n},
        f"dask: local cluster of {n} worker process(es)",
    )


@contextlib.contextmanager
def prefect_api_for_workers(kind: str) -> Iterator[str | None]:
    """Make sure Dask workers report to the flow's Prefect API.

    With no PREFECT_API_URL, Prefect runs a flow against a temporary server it starts inside
    the process, and a Dask worker process, knowing no URL either, would start a temporary
    server of its own: its task runs would land there, unseen, after a long start. So for the
    dask runner start that temporary server here, explicitly, and point the settings at it:
    the settings travel with every task to the workers (prefect-dask sends the context). With
    a real server (PREFECT_API_URL set), nothing changes.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    current = PREFECT_API_URL.value()
    if kind != "dask" or current:
        yield current
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's own ephemeral mode would use
    server.start()  # stopped at exit, as Prefect's ephemeral server is
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        yield server.api_url
