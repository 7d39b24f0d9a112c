"""The sweep's record in MLflow: the tags it sets and the runs it reads back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Tags (MLflow) and names used across runs.
TAG_ROLE = "sweep.role"  # parent | trial
TAG_KEY = "sweep.key"  # the sweep's key (parent and children)
TAG_NAME = "sweep.name"
TAG_TRIAL = "sweep.trial"  # the trial's index
TAG_TRIAL_KEY = "sweep.trial_key"
TAG_COMPLETE = "sweep.complete"  # "true" once a trial trained, evaluated and logged everything
TAG_OVERRIDES = "sweep.overrides"
TAG_FAILURE = "failure.reason"  # the pipeline's name for it
TRIAL_MODEL_ARTIFACT = "trial_model"  # model.pt + model_config.json of every trial
TERMINAL = ("FINISHED", "FAILED", "KILLED")


def _log_params_once(client: Any, run_id: str, flat: Mapping[str, Any]) -> None:
    """Log params not yet on the run (params are immutable: a resumed run keeps its own)."""
    from flows import tracking

    have = client.get_run(run_id).data.params
    tracking.log_params(client, run_id, {k: v for k, v in flat.items() if k not in have})


def _set_tags(client: Any, run_id: str, tags: Mapping[str, Any]) -> None:
    from mlflow.entities import RunTag

    batch = [RunTag(k, str(v)[:5000]) for k, v in tags.items()]
    for i in range(0, len(batch), 100):
        client.log_batch(run_id, tags=batch[i : i + 100])


def _quote(value: str) -> str:
    return value.replace("'", "")


def find_parent(client: Any, experiment_id: str, key: str) -> Any | None:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_KEY}` = '{_quote(key)}' and tags.`{TAG_ROLE}` = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def child_runs(client: Any, experiment_id: str, parent_run_id: str) -> list:
    """Every child run of a parent, oldest first."""
    out, token = [], None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{_quote(parent_run_id)}'",
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        out.extend(page)
        token = page.token
        if not token:
            return out


def is_complete(run: Any) -> bool:
    return run.info.status == "FINISHED" and run.data.tags.get(TAG_COMPLETE) == "true"


def latest_by_trial(children: Sequence[Any]) -> dict[str, Any]:
    """Per trial key, the run that speaks for it: a complete one, else the newest."""
    best: dict[str, Any] = {}
    for run in children:  # oldest first: newer ones replace older ones
        key = run.data.tags.get(TAG_TRIAL_KEY)
        if key and not (key in best and is_complete(best[key])):
            best[key] = run
    return best
