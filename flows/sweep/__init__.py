"""Hyperparameter sweeps: many trainings on one prepared dataset, compared in MLflow.

    vae-pipeline sweep [--sweep-file sweep.yaml] [--task-runner sequential|threads|dask]
                       [--dask-address tcp://host:8786] [--dask-workers N] [-S key=value]

The sweep file (``sweep.yaml`` at the repo root) names the keys to vary; everything else comes
from params.yaml plus any ``-S`` overrides (the *base*). One Prefect flow run does:

1. ``dvc repro`` once (the pipeline's ``fetch_data`` / ``prepare_data`` tasks): trials may vary
   only ``model.*`` and ``train.*``, so they all read the same prepared data;
2. one MLflow *parent* run holding the sweep's definition (params + ``sweep/`` artifacts);
3. one MLflow *child* run per trial (tag ``mlflow.parentRunId``), trained and evaluated by the
   pipeline's own ``train_model`` and ``evaluate`` tasks, inside one ``sweep-trial`` task per
   trial submitted to a Prefect task runner (threads, or Dask with worker processes);
4. a summary table on the parent (``client.log_table`` + CSV + markdown) and as a Prefect
   table artifact;
5. the best trial by the sweep's metric through the pipeline's ``register`` and ``promote``
   tasks: the same registration and the same promotion gate as a single run.

Resume. Every trial has a key: the hash of its full parameters and of the prepared data's DVC
md5. Its child run carries the key as a tag and gets the tag ``sweep.complete=true`` only after
training, evaluation and artifact logging all succeeded. Running the same sweep again (same
trials, same data: the same ``sweep.key``) reopens the same parent run and submits only the
trials without a complete child (``plan_trials``): finished ones are read back from MLflow,
failed ones stay failed (``--retry-failed`` runs them again in a new child run), interrupted
ones (RUNNING, SCHEDULED, KILLED) run again in the same child run, where the trainer resumes
from its last epoch checkpoint if the trial ran on this machine before. MLflow is the record
every worker must reach anyway, so this works the same for threads, local Dask worker
processes and Dask workers on other machines; Prefect's result-store cache would need a result
storage every worker shares, and could say "done" about a run MLflow no longer has.

Devices. A trial whose ``train.device`` is ``auto`` claims one: with several GPUs, one trial
per GPU (Dask worker ``i`` uses ``cuda:{i % n}``; threads take a free GPU from a pool); on a
CPU, ``torch.set_num_threads(cores // parallel trials on this host)``.

This package imports Prefect, MLflow and torch lazily, so the CLI stays quick to start; the
Prefect flow and task (``sweep_flow``, ``run_trial``) are built on first access.

Modules: ``spec`` (the sweep file), ``trials`` (the trials, their keys, the resume plan),
``devices`` (a trial's device and threads), ``records`` (tags and runs in MLflow), ``task``
(one trial's training), ``tables`` (the summary), ``runners`` (Prefect task runners),
``flow`` (the Prefect flow, ``run_sweep`` and the deployment's entrypoint
``flows/sweep/flow.py:sweep_deployment``) and ``cli`` (the ``sweep`` subcommand).
"""

from __future__ import annotations

from typing import Any

from flows.sweep.cli import add_sweep_parser, cmd_sweep
from flows.sweep.devices import claim_device, host_cores, parallel_trials_here
from flows.sweep.flow import (
    PREFECT_OBJECTS,
    PREFECT_SUMMARY_KEY,
    PREFECT_TABLE_KEY,
    _prefect_objects,
    run_sweep,
)
from flows.sweep.records import (
    TAG_COMPLETE,
    TAG_FAILURE,
    TAG_KEY,
    TAG_NAME,
    TAG_OVERRIDES,
    TAG_ROLE,
    TAG_TRIAL,
    TAG_TRIAL_KEY,
    TERMINAL,
    TRIAL_MODEL_ARTIFACT,
    child_runs,
    find_parent,
    is_complete,
    latest_by_trial,
)
from flows.sweep.runners import (
    RUNNERS,
    RunnerChoice,
    local_cluster_kwargs,
    make_task_runner,
    prefect_api_for_workers,
    scheduler_hosts,
)
from flows.sweep.spec import (
    DEFAULT_SWEEP_FILE,
    DISTRIBUTIONS,
    METHODS,
    SELECTABLE_METRICS,
    SPEC_KEYS,
    SWEEPABLE_SECTIONS,
    SweepError,
    SweepSpec,
    load_sweep,
    parse_sweep,
)
from flows.sweep.tables import (
    TABLE_ARTIFACT,
    TABLE_METRICS,
    choose_best,
    csv_table,
    format_run_tree,
    markdown_table,
    table_columns,
    trial_row,
)
from flows.sweep.trials import (
    Trial,
    expand_trials,
    plan_trials,
    same_family,
    sweep_key,
    trial_key,
    with_keys,
    yaml_scalar,
)

__all__ = [
    "DEFAULT_SWEEP_FILE",
    "DISTRIBUTIONS",
    "METHODS",
    "PREFECT_OBJECTS",
    "PREFECT_SUMMARY_KEY",
    "PREFECT_TABLE_KEY",
    "RUNNERS",
    "SELECTABLE_METRICS",
    "SPEC_KEYS",
    "SWEEPABLE_SECTIONS",
    "TABLE_ARTIFACT",
    "TABLE_METRICS",
    "TAG_COMPLETE",
    "TAG_FAILURE",
    "TAG_KEY",
    "TAG_NAME",
    "TAG_OVERRIDES",
    "TAG_ROLE",
    "TAG_TRIAL",
    "TAG_TRIAL_KEY",
    "TERMINAL",
    "TRIAL_MODEL_ARTIFACT",
    "RunnerChoice",
    "SweepError",
    "SweepSpec",
    "Trial",
    "add_sweep_parser",
    "child_runs",
    "choose_best",
    "claim_device",
    "cmd_sweep",
    "csv_table",
    "expand_trials",
    "find_parent",
    "format_run_tree",
    "host_cores",
    "is_complete",
    "latest_by_trial",
    "load_sweep",
    "local_cluster_kwargs",
    "make_task_runner",
    "markdown_table",
    "parallel_trials_here",
    "parse_sweep",
    "plan_trials",
    "prefect_api_for_workers",
    "run_sweep",
    "same_family",
    "scheduler_hosts",
    "sweep_key",
    "table_columns",
    "trial_key",
    "trial_row",
    "with_keys",
    "yaml_scalar",
]


def __getattr__(name: str) -> Any:  # PEP 562: `from flows.sweep import sweep_flow`
    if name in PREFECT_OBJECTS:
        return _prefect_objects()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
