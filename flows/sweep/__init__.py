"""Hyperparameter sweeps: many trainings on one prepared dataset, compared in MLflow.

One Prefect flow run (``flow.sweep_flow``) prepares the data once, opens one MLflow parent run
and runs each trial of the sweep file (``spec``) as a child run, through the pipeline's own
tasks in a ``sweep-trial`` task mapped over the task runner asked for (threads, or Dask). One
markdown table goes to the parent and to Prefect; the best trial by the sweep's metric goes
through the pipeline's ``register`` and ``promote``. A trial's key hashes its params and the
data's md5; the same sweep again reruns only what ``trials.plan_trials`` says (docs/sweeps.md).

The entry point is ``flows.sweep.flow.run_sweep`` (it imports Prefect); this package itself
exports only the light parts: the sweep file and its trials.
"""

from flows.sweep.spec import SweepError, SweepSpec, load_sweep, parse_sweep
from flows.sweep.trials import Trial

__all__ = ["SweepError", "SweepSpec", "Trial", "load_sweep", "parse_sweep"]
