"""The sweep's Prefect flow: data prepared once, one child run per trial through the task
runner, the summary, and the winner through registration and the promotion gate.

The Prefect task and flows (`run_trial`, `sweep_flow`, `sweep_deployment`) are built on first
access (PEP 562 `__getattr__`), so importing this module does not import Prefect."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from flows.params import (
    flatten,
    load_params,
)
from flows.sweep.records import (
    TAG_FAILURE,
    TAG_KEY,
    TAG_NAME,
    TAG_OVERRIDES,
    TAG_ROLE,
    TAG_TRIAL,
    TAG_TRIAL_KEY,
    TRIAL_MODEL_ARTIFACT,
    _log_params_once,
    _set_tags,
    child_runs,
    find_parent,
    is_complete,
    latest_by_trial,
)
from flows.sweep.runners import make_task_runner, prefect_api_for_workers
from flows.sweep.spec import DEFAULT_SWEEP_FILE, SweepSpec, load_sweep
from flows.sweep.tables import _log_summary, _summary_markdown, choose_best, trial_row
from flows.sweep.task import _run_trial_fn
from flows.sweep.trials import Trial, expand_trials, plan_trials, sweep_key, with_keys, yaml_scalar

PREFECT_TABLE_KEY = "vae-sweep-summary"
PREFECT_SUMMARY_KEY = "vae-sweep-result"


def _sweep_flow_fn(
    sweep_file: str = DEFAULT_SWEEP_FILE,
    overrides: list[str] | None = None,
    workdir: str = ".",
    retry_failed: bool = False,
    slots: dict | None = None,
) -> dict[str, Any]:
    """Prepare the data once, run every unfinished trial as a child run through the flow's
    task runner, tabulate, and send the best trial through registration and the gate."""
    from filelock import FileLock
    from prefect import get_run_logger
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from flows import tracking
    from flows.params import write_params
    from flows.pipeline import (
        LOCK_NAME,
        fetch_data,
        prepare_data,
        processed_path,
        promote,
        register,
    )
    from vae_core.data.idx import atomic_write_bytes

    logger = get_run_logger()
    root = Path(workdir).resolve()
    overrides = list(overrides or [])
    slots = dict(slots or {"default": 1})
    sweep_path = Path(sweep_file) if Path(sweep_file).is_absolute() else root / sweep_file
    spec = load_sweep(sweep_path)
    base = load_params(root / "params.yaml", overrides)  # refuse bad values before any work
    trials = expand_trials(spec, base)
    swept = list(dict.fromkeys(k for t in trials for k in t.overrides))

    client = tracking.configure(root)
    uri = client.tracking_uri  # what the trials must log to, in whatever process they run
    tracking.ensure_reachable(client)  # an unreachable backend fails here, not after training
    params_file = root / "params.yaml"
    with FileLock(str(root / LOCK_NAME)):
        # As in the pipeline: a sweep that fails puts params.yaml and dvc.lock back, so the next
        # run does not silently inherit its overrides.
        saved = {
            path: path.read_bytes() for path in (params_file, root / "dvc.lock") if path.is_file()
        }
        try:
            # Like `dvc exp run -S`: base overrides go into params.yaml, for the DVC stages.
            base = write_params(params_file, overrides) if overrides else base
            fetch_data(str(root))
            lineage = prepare_data(str(root), base["data"]["dataset"])
            trials = with_keys(trials, lineage["processed_md5"])
            key = sweep_key(spec, trials)

            experiment_id = tracking.ensure_experiment(client, base["data"]["dataset"], root)
            lineage_tags = tracking.lineage_tags(base, lineage, root, "per trial")
            found = find_parent(client, experiment_id, key)
            parent_tags = lineage_tags | {
                TAG_ROLE: "parent",
                TAG_KEY: key,
                TAG_NAME: spec.name,
                "sweep.method": spec.method,
                "sweep.metric": spec.metric,
                "sweep.goal": spec.goal,
                "sweep.num_trials": str(len(trials)),
                "sweep.file": str(sweep_path),
            }
            parent_id = _open_parent(client, experiment_id, found, parent_tags, spec, key, logger)
            try:
                result = _run_sweep_body(
                    client=client,
                    spec=spec,
                    trials=trials,
                    swept=swept,
                    base=base,
                    overrides=overrides,
                    root=root,
                    uri=uri,
                    slots=slots,
                    experiment_id=experiment_id,
                    parent_id=parent_id,
                    key=key,
                    lineage=lineage,
                    lineage_tags=lineage_tags,
                    retry_failed=retry_failed,
                    fresh_parent=found is None,
                    processed=processed_path(root, base["data"]["dataset"]),
                    register=register,
                    promote=promote,
                    logger=logger,
                )
            except BaseException as exc:
                status = "FAILED" if isinstance(exc, Exception) else "KILLED"
                _set_tags(client, parent_id, {TAG_FAILURE: f"{type(exc).__name__}: {exc}"})
                client.set_terminated(parent_id, status, end_time=int(time.time() * 1000))
                raise
        except BaseException:
            for path, content in saved.items():
                atomic_write_bytes(path, content)
            raise
    create_table_artifact(
        [{k: _json_safe(v) for k, v in row.items()} for row in result["rows"]],
        key=PREFECT_TABLE_KEY,
        description=f"sweep {spec.name}: one row per trial (MLflow parent run {parent_id})",
    )
    create_markdown_artifact(
        result["summary_markdown"],
        key=PREFECT_SUMMARY_KEY,
        description=f"sweep {spec.name}: winner, registration and promotion gate",
    )
    from prefect import runtime

    result["flow_run_id"] = str(runtime.flow_run.id)
    return {k: v for k, v in result.items() if k != "summary_markdown"}


def _open_parent(
    client: Any,
    experiment_id: str,
    found: Any | None,
    tags: dict[str, str],
    spec: SweepSpec,
    key: str,
    logger: Any,
) -> str:
    """A new parent run, or the earlier attempt's (``found``) reopened; returns its id."""
    if found is None:
        parent = client.create_run(
            experiment_id, tags=tags, run_name=f"sweep-{spec.name}-{key[:6]}"
        )
        _set_tags(client, parent.info.run_id, {"sweep.attempt": 1})
        return parent.info.run_id
    parent_id = found.info.run_id
    client.update_run(parent_id, "RUNNING")
    if TAG_FAILURE in found.data.tags:  # the earlier attempt's failure is history now
        client.delete_tag(parent_id, TAG_FAILURE)
    attempt = int(found.data.tags.get("sweep.attempt", "1")) + 1
    _set_tags(client, parent_id, tags | {"sweep.attempt": attempt})
    logger.info("resuming sweep %s (key %s) in parent run %s", spec.name, key, parent_id)
    return parent_id


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _run_sweep_body(
    *,
    client: Any,
    spec: SweepSpec,
    trials: list[Trial],
    swept: list[str],
    base: dict,
    overrides: list[str],
    root: Path,
    uri: str,
    slots: dict,
    experiment_id: str,
    parent_id: str,
    key: str,
    lineage: dict,
    lineage_tags: dict,
    retry_failed: bool,
    fresh_parent: bool,
    processed: Path,
    register: Any,
    promote: Any,
    logger: Any,
) -> dict[str, Any]:
    from flows import tracking

    definition = {
        "sweep": spec.to_dict(),
        "base_overrides": overrides,
        "data": {"processed_md5": lineage["processed_md5"], "raw_md5": lineage["raw_md5"]},
        "sweep_key": key,
        "trials": [
            {"index": t.index, "label": t.label, "key": t.key, "overrides": t.overrides}
            for t in trials
        ],
    }
    space = {f"sweep.space.{entry}": yaml_scalar(value) for entry, value in spec.parameters.items()}
    _log_params_once(
        client,
        parent_id,
        flatten(base)
        | {"overrides": " ".join(overrides)}
        | space
        | {"sweep.method": spec.method, "sweep.num_trials": str(len(trials))},
    )
    client.log_text(parent_id, yaml.safe_dump(definition, sort_keys=False), "sweep/sweep.yaml")
    client.log_text(
        parent_id, json.dumps([t.to_dict() for t in trials], indent=2), "sweep/trials.json"
    )
    if fresh_parent:
        tracking.log_dataset(parent_id, lineage, processed, base["data"]["dataset"])
        client.update_run(parent_id, "RUNNING")

    # What is already done: MLflow is the record (see the package docstring).
    existing = {
        k: (r.info.run_id, r.info.status, is_complete(r))
        for k, r in latest_by_trial(child_runs(client, experiment_id, parent_id)).items()
    }
    plan = plan_trials(trials, existing, retry_failed)
    run_ids: dict[int, str] = {}
    reused: set[int] = set()
    for t in trials:
        action, old_id = plan[t.index]
        if action in ("done", "keep-failed"):
            reused.add(t.index)
            continue
        if action == "resume" and old_id is not None:
            # Interrupted: the same child run again; the trainer resumes from its checkpoint.
            client.update_run(old_id, "SCHEDULED")
            _set_tags(client, old_id, {"sweep.resumed": "true"})
            run_ids[t.index] = old_id
            continue
        run_ids[t.index] = _create_child(
            client,
            experiment_id,
            parent_id,
            spec,
            t,
            key,
            overrides,
            lineage,
            lineage_tags,
            processed,
            base["data"]["dataset"],
        )
    logger.info(
        "sweep %s: %d trial(s), %d already done, %d to run",
        spec.name,
        len(trials),
        len(reused),
        len(run_ids),
    )

    run_trial = _prefect_objects()["run_trial"]
    futures = {
        t.index: run_trial.with_options(task_run_name=f"trial-{t.label}").submit(
            str(root), t.to_dict(), run_ids[t.index], uri, slots
        )
        for t in trials
        if t.index in run_ids
    }
    for index, future in futures.items():
        future.wait()
        state = future.state
        run = client.get_run(run_ids[index])
        if not state.is_completed() and run.info.status not in ("FAILED", "KILLED"):
            # The task died without recording it (a lost worker, say): record it here.
            reason = state.message or str(state.type)
            _set_tags(client, run_ids[index], {TAG_FAILURE: reason})
            client.set_terminated(run_ids[index], "FAILED", end_time=int(time.time() * 1000))

    latest = latest_by_trial(child_runs(client, experiment_id, parent_id))
    rows = [trial_row(t, latest.get(t.key), swept, t.index in reused) for t in trials]
    best_index, why = choose_best(spec, trials, rows, base)
    counts = {
        "trials": len(trials),
        "finished": sum(r["status"] == "FINISHED" for r in rows),
        "failed": sum(r["status"] == "FAILED" for r in rows),
        "reused": len(reused),
        "ran": len(futures),
    }
    table_md = _log_summary(client, parent_id, rows)  # before registration, in case it fails
    tracking.log_flat_metrics(client, parent_id, {f"sweep.{k}": v for k, v in counts.items()})

    model = gate = None
    best_row = None
    parent_tags = client.get_run(parent_id).data.tags
    if best_index is not None:
        best = trials[best_index]
        best_row = rows[best_index]
        best_run = latest[best.key]
        value = best_row[spec.metric]
        _set_tags(
            client,
            parent_id,
            {
                "sweep.best_run_id": best_run.info.run_id,
                "sweep.best_trial": best.label,
                "sweep.best_reason": why,
            },
        )
        tracking.log_flat_metrics(client, parent_id, {f"best.{spec.metric}": value})
        same_winner = parent_tags.get("sweep.best_run_id") == best_run.info.run_id
        if not same_winner and parent_tags.get("sweep.best_run_id"):
            # A retried trial beat an earlier attempt's winner.
            _set_tags(client, parent_tags["sweep.best_run_id"], {"sweep.winner": "superseded"})
        if same_winner and parent_tags.get("sweep.model_version"):
            model = {
                "name": parent_tags["sweep.model_name"],
                "version": parent_tags["sweep.model_version"],
            }
            logger.info(
                "winner %s was registered as %s v%s by an earlier attempt",
                best.label,
                model["name"],
                model["version"],
            )
        else:
            model_dir = _local_model_dir(client, root, best_run.info.run_id)
            reg_tags = _registration_tags(best_run, best_row, parent_id)
            model = register(str(root), best.params, best_run.info.run_id, model_dir, reg_tags)
            _set_tags(
                client,
                parent_id,
                {"sweep.model_name": model["name"], "sweep.model_version": model["version"]},
            )
            parent_tags = {}
        if same_winner and parent_tags.get("gate.decision"):
            gate = {
                "decision": parent_tags["gate.decision"],
                "reason": parent_tags.get("gate.reason", ""),
                "from_earlier_attempt": True,
            }
        else:
            gate = promote(str(root), best.params, model["name"], model["version"])
            decision = {
                "gate.decision": gate.get("decision", ""),
                "gate.reason": gate.get("reason", ""),
            }
            _set_tags(client, parent_id, decision)
            _set_tags(client, best_run.info.run_id, decision | {"sweep.winner": "true"})
        for row in rows:
            if row["trial"] == best.label:
                row["note"] = (
                    f"best: {model['name']} v{model['version']}, gate {gate.get('decision')}"
                )
        table_md = _log_summary(client, parent_id, rows)
    else:
        _set_tags(client, parent_id, {"sweep.best_reason": why})
        logger.warning("sweep %s: no winner: %s", spec.name, why)

    summary = _summary_markdown(spec, key, parent_id, counts, table_md, best_row, why, model, gate)
    client.log_text(parent_id, summary, "sweep_result.md")
    status = "FINISHED" if counts["finished"] else "FAILED"
    if not counts["finished"]:
        _set_tags(client, parent_id, {TAG_FAILURE: "no trial finished"})
    client.set_terminated(parent_id, status, end_time=int(time.time() * 1000))
    return {
        "sweep": spec.name,
        "sweep_key": key,
        "parent_run_id": parent_id,
        "experiment_id": experiment_id,
        "tracking_uri": uri,
        "metric": spec.metric,
        "counts": counts,
        "rows": rows,
        "best": None
        if best_row is None
        else {
            "trial": best_row["trial"],
            "run_id": best_row["run_id"],
            spec.metric: best_row[spec.metric],
            "reason": why,
        },
        "model": model,
        "gate": gate,
        "table_markdown": table_md,
        "summary_markdown": summary,
    }


def _create_child(
    client: Any,
    experiment_id: str,
    parent_id: str,
    spec: SweepSpec,
    trial: Trial,
    key: str,
    overrides: list[str],
    lineage: dict,
    lineage_tags: dict,
    processed: Path,
    dataset: str,
) -> str:
    """A SCHEDULED child run with the trial's params and lineage, before it is submitted."""
    from flows import tracking

    tags = lineage_tags | {
        "mlflow.parentRunId": parent_id,
        TAG_ROLE: "trial",
        TAG_KEY: key,
        TAG_NAME: spec.name,
        TAG_TRIAL: str(trial.index),
        TAG_TRIAL_KEY: trial.key,
        TAG_OVERRIDES: " ".join(trial.override_strings()),
        "params.hash": tracking.params_hash(trial.params),
        "device": "unassigned",
    }
    run = client.create_run(experiment_id, tags=tags, run_name=f"{spec.name}-{trial.label}")
    run_id = run.info.run_id
    # The same keys on every child (the full params), so MLflow's compare view lines them up.
    tracking.log_params(
        client,
        run_id,
        flatten(trial.params) | {"overrides": " ".join(overrides + trial.override_strings())},
    )
    tracking.log_dataset(run_id, lineage, processed, dataset)
    client.update_run(run_id, "SCHEDULED")
    return run_id


def _local_model_dir(client: Any, root: Path, run_id: str) -> str:
    """The trial's saved model: on this disk when the trial ran here, else downloaded from
    the run's artifacts (a Dask worker on another machine)."""
    local = root / "runs" / run_id / "train" / "model"
    if (local / "model_config.json").is_file():
        return str(local)
    target = root / "runs" / run_id / "downloaded"
    target.mkdir(parents=True, exist_ok=True)
    return client.download_artifacts(run_id, TRIAL_MODEL_ARTIFACT, str(target))


def _registration_tags(run: Any, row: dict, parent_id: str) -> dict[str, str]:
    """The version's tags: the trial's lineage (data md5, commit, params hash, Prefect flow
    run, device) as the pipeline records them, plus where in which sweep it came from."""
    keep = ("git.", "dvc.", "params.", "data.", "prefect.", "sweep.")
    tags = {
        k: v
        for k, v in run.data.tags.items()
        if k.startswith(keep) or k in ("device", "torch.version", "python.version")
    }
    headline = {
        f"metric.{k}": f"{row[k]:.4f}"
        for k in ("test_neg_elbo", "test_nll_iwae", "val_neg_elbo")
        if row.get(k) is not None
    }
    return tags | headline | {"mlflow.run_id": run.info.run_id, "sweep.parent_run_id": parent_id}


_PREFECT: dict[str, Any] = {}
PREFECT_OBJECTS = ("run_trial", "sweep_flow", "sweep_deployment")


def _prefect_objects() -> dict[str, Any]:
    """Build the Prefect task and flows on first use (importing Prefect costs seconds, which
    every `vae-pipeline` command would otherwise pay when the CLI imports this module)."""
    if __name__ != "flows.sweep.flow":
        # Loaded from its path (a deployment's `flows/sweep/flow.py:...` entrypoint): use the
        # package's module, so Dask workers can import the trial function by its name.
        import importlib

        return importlib.import_module("flows.sweep.flow")._prefect_objects()
    if not _PREFECT:
        from prefect import flow, task
        from prefect.cache_policies import NO_CACHE

        # NO_CACHE: resume is decided from MLflow by the flow (see the package docstring).
        _PREFECT["run_trial"] = task(name="sweep-trial", cache_policy=NO_CACHE)(_run_trial_fn)
        _PREFECT["sweep_flow"] = flow(name="vae-sweep", log_prints=True)(_sweep_flow_fn)
        _PREFECT["sweep_deployment"] = flow(name="vae-sweep-deployment")(_sweep_deployment_fn)
    return _PREFECT


def __getattr__(name: str) -> Any:  # PEP 562: `from flows.sweep import sweep_flow`
    if name in PREFECT_OBJECTS:
        return _prefect_objects()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _sweep_deployment_fn(
    sweep_file: str = DEFAULT_SWEEP_FILE,
    overrides: list[str] | None = None,
    workdir: str = ".",
    task_runner: str | None = None,
    max_workers: int | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """What a deployment runs (`flows/sweep/flow.py:sweep_deployment`, picked up by a Prefect worker
    of a work pool): the CLI's choices as parameters; the sweep itself runs as a subflow with
    the task runner they name."""
    return run_sweep(
        sweep_file,
        list(overrides or []),
        workdir,
        task_runner=task_runner,
        max_workers=max_workers,
        dask_address=dask_address,
        dask_workers=dask_workers,
        retry_failed=retry_failed,
    )


def run_sweep(
    sweep_file: str = DEFAULT_SWEEP_FILE,
    overrides: Sequence[str] = (),
    workdir: str = ".",
    *,
    task_runner: str | None = None,
    max_workers: int | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    retry_failed: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a sweep through the chosen task runner; returns the flow's result."""
    root = Path(workdir).resolve()
    sweep_path = Path(sweep_file) if Path(sweep_file).is_absolute() else root / sweep_file
    spec = load_sweep(sweep_path)  # fail fast, before Prefect starts
    expand_trials(spec, load_params(root / "params.yaml", list(overrides)))
    choice = make_task_runner(
        task_runner, max_workers=max_workers, dask_address=dask_address, dask_workers=dask_workers
    )
    flow = _prefect_objects()["sweep_flow"].with_options(
        task_runner=choice.runner, flow_run_name=f"sweep-{spec.name}"
    )
    with prefect_api_for_workers(choice.kind):
        return flow(
            sweep_file=str(sweep_path),
            overrides=list(overrides),
            workdir=str(root),
            retry_failed=retry_failed,
            slots=choice.slots,
        )
