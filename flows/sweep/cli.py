"""The `vae-pipeline sweep` subcommand."""

from __future__ import annotations

import argparse
import sys

from flows.params import add_override_argument
from flows.sweep.flow import run_sweep
from flows.sweep.runners import RUNNERS
from flows.sweep.spec import DEFAULT_SWEEP_FILE
from flows.sweep.tables import _cell, format_run_tree


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> None:
    """The `vae-pipeline sweep` subcommand."""
    p = subparsers.add_parser(
        "sweep",
        help="run (or resume) a hyperparameter sweep: one MLflow child run per trial",
        description="Grid or random search over model.* and train.* keys (see sweep.yaml and "
        "docs/sweeps.md). Data are prepared once; finished trials are never run twice.",
    )
    p.add_argument(
        "--sweep-file",
        default=DEFAULT_SWEEP_FILE,
        help="the sweep definition, relative to --workdir (default: sweep.yaml)",
    )
    p.add_argument(
        "--task-runner",
        choices=RUNNERS,
        default=None,
        help="how trials run: sequential, threads (default) or dask",
    )
    p.add_argument(
        "--max-workers",
        type=int,
        default=None,
        help="threads: trials at once (default: one per GPU, else 1)",
    )
    p.add_argument(
        "--dask-address",
        default=None,
        metavar="tcp://HOST:PORT",
        help="run trials on this Dask scheduler (implies --task-runner dask)",
    )
    p.add_argument(
        "--dask-workers",
        type=int,
        default=None,
        metavar="N",
        help="run trials on a new local Dask cluster of N worker processes (implies dask; "
        "default: one per GPU, else cores // 2)",
    )
    p.add_argument(
        "--retry-failed",
        action="store_true",
        help="run trials that failed in an earlier attempt again (default: keep them failed)",
    )
    add_override_argument(p, "override a base parameter for every trial, e.g. -S train.epochs=3")
    p.add_argument("--workdir", default=".", help="the project folder (params.yaml, dvc.yaml)")


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run the sweep; print the summary table and the MLflow run tree. Exit status 1 when no
    trial finished."""
    from flows.cli import _quiet_prefect_defaults

    _quiet_prefect_defaults()
    result = run_sweep(
        args.sweep_file,
        args.overrides,
        args.workdir,
        task_runner=args.task_runner,
        max_workers=args.max_workers,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
        retry_failed=args.retry_failed,
    )
    from mlflow import MlflowClient

    client = MlflowClient(result["tracking_uri"])
    print(result["table_markdown"])
    print(format_run_tree(client, result["parent_run_id"], result["metric"]))
    if result["model"]:
        gate = result["gate"] or {}
        print(
            f"\nbest {result['best']['trial']} ({result['metric']} "
            f"{_cell(result['best'][result['metric']])}) -> {result['model']['name']} "
            f"v{result['model']['version']}; gate {gate.get('decision')}: {gate.get('reason')}"
        )
    else:
        print(f"\nno winner: {result['best'] or 'no comparable finished trial'}", file=sys.stderr)
    return 0 if result["counts"]["finished"] else 1
