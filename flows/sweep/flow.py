"""The sweep's Prefect flow: the data prepared once, one MLflow child run per trial through the
flow's task runner, one summary table, and the winner through registration and the gate."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import yaml
from mlflow.tracking import MlflowClient
from prefect import flow, get_run_logger, runtime, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import tracking, workspace
from flows.params import Params, load_params, yaml_scalar
from flows.pipeline import (
    evaluate,
    headline_tags,
    promote,
    refresh_data,
    register,
    train_model,
)
from flows.recovery import settle_dead_run
from flows.sweep.spec import SELECTABLE_METRICS, SweepError, SweepSpec, load_sweep
from flows.sweep.trials import Trial, expand_trials, plan_trials, same_family, sweep_key, with_keys

TAG_KEY, TAG_TRIAL_KEY, TAG_COMPLETE = "sweep.key", "sweep.trial_key", "sweep.complete"
#: The summary's figure columns, each a metric of every child run, by its MLflow name: what
#: can choose the winner, then test figures (reported, never chosen by) with the
#: real-versus-real reference beside FD, then the training's counts.
TABLE_METRICS = (
    *SELECTABLE_METRICS,
    "test/neg_elbo",
    "test/nll_iwae",
    "sample_quality/fd",
    "sample_quality/ref_fd",
    "sample_quality/kid",
    "sample_quality/precision",
    "sample_quality/recall",
    "train/epochs",
    "time/mean_train_images_per_second",
)
#: Columns that are counts: shown as whole numbers.
COUNT_COLUMNS = ("train/epochs", "time/mean_train_images_per_second")
REUSED = ("done", "keep-failed")  # what plan_trials says of trials read back, not run


def local_cluster_kwargs(n_workers: int) -> dict[str, Any]:
    """A one-machine Dask cluster: single-threaded worker processes bound to 127.0.0.1."""
    return {
        "n_workers": n_workers,
        "threads_per_worker": 1,
        "processes": True,
        "host": "127.0.0.1",
        "dashboard_address": "127.0.0.1:0",
    }


def task_runner(
    max_workers: int | None = None, dask_address: str | None = None, dask_workers: int | None = None
) -> Any:
    """Threads in this process (one trial at a time unless ``max_workers``), an existing Dask
    cluster (``dask_address``), or a new local one of ``dask_workers`` processes."""
    if dask_address and dask_workers:
        raise SweepError("--dask-workers sizes a local cluster; omit it with --dask-address")
    for name, value in (("--max-workers", max_workers), ("--dask-workers", dask_workers)):
        if value is not None and value < 1:
            raise SweepError(f"{name}: expected an integer >= 1, found {value}")
    if not (dask_address or dask_workers):
        return ThreadPoolTaskRunner(max_workers=max_workers or 1)
    from prefect_dask import DaskTaskRunner

    if dask_address:
        return DaskTaskRunner(address=dask_address)
    return DaskTaskRunner(cluster_kwargs=local_cluster_kwargs(dask_workers or 1))


def child_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    """Every child run of a parent (up to MLflow's 50,000 a search), oldest first."""
    query = f"tags.`mlflow.parentRunId` = '{parent_run_id}'"
    order = ["attributes.start_time ASC"]
    return list(client.search_runs([experiment_id], query, max_results=50_000, order_by=order))


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


@task(
    name="sweep-trial",
    task_run_name="trial-{trial.label}",
    cache_policy=NO_CACHE,
    retries=2,
    retry_delay_seconds=[20, 60],
    retry_condition_fn=tracking.retry_on_server_hiccup,
)
def run_trial(workdir: str, trial: Trial, run_id: str, tracking_uri: str) -> str:
    """Train and evaluate one trial into its child run (created by the flow), on whichever
    worker the task runner picks. Resume is decided from MLflow, hence NO_CACHE.

    A trial cut short by the tracking server (down, restarting, its database restarting) is
    interrupted, not failed: its run is KILLED and the task tries again twice, resuming from
    the trial's last checkpoint; if the server is still away, rerunning the sweep resumes it."""
    import torch

    from vae_core.training import pick_device

    client = tracking.connect(tracking_uri)
    with tracking.run_scope(client, run_id=run_id, interrupted=_resumable):
        try:
            from distributed import get_worker

            worker = get_worker().address
        except (ImportError, ValueError):
            worker = f"pid {os.getpid()}"
        params = trial.params
        device = str(pick_device(params.train.device))
        tags = {
            "device": device,
            "torch.num_threads": torch.get_num_threads(),
            "sweep.worker": worker,
        }
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
        processed = workspace.processed_dir(workdir, params.data.dataset)
        if not processed.is_dir():
            raise FileNotFoundError(
                f"{processed}: no prepared data on this worker; a worker on another machine "
                f"needs the project at {workdir} on the same commit and `dvc pull` run there"
            )
        get_run_logger().info("trial %s on %s: %s", trial.label, device, trial.override_strings())
        train = train_model(workdir, params, run_id, tracking_uri)
        evaluate(workdir, params, run_id, tracking_uri, train["model_dir"], train["model_id"])
        client.set_tag(run_id, "sweep.model_uri", train["model_uri"])
        client.set_tag(run_id, TAG_COMPLETE, "true")
    return run_id


def _resumable(exc: BaseException) -> bool:
    """A trial stopped by an interruption (not an Exception) or by the tracking server (down,
    restarting) can resume from its checkpoint: its run is KILLED, not FAILED."""
    return not isinstance(exc, Exception) or tracking.server_hiccup(exc)


def trial_row(trial: Trial, run: Any | None, swept: Sequence[str], reused: bool) -> dict:
    """One line of the summary table, read back from the trial's child run."""
    row: dict[str, Any] = {"trial": trial.label}
    row |= {key: yaml_scalar(trial.overrides.get(key, "")) for key in swept}
    status = "NOT RUN" if run is None else run.info.status
    row["status"] = "INCOMPLETE" if status == "FINISHED" and not is_complete(run) else status
    metrics = run.data.metrics if run is not None else {}
    for name in TABLE_METRICS:
        value = metrics.get(name)
        row[name] = float(value) if value is not None and math.isfinite(value) else None
    for name in COUNT_COLUMNS:
        row[name] = None if row[name] is None else round(row[name])
    row |= {"reused": reused, "run_id": run and run.info.run_id, "note": ""}
    row["note"] = run.data.tags.get("failure.reason", "")[:160] if run is not None else ""
    return row


def markdown_table(rows: Sequence[dict]) -> str:
    """The table, leaving out metric columns no trial has (no classifier: no sq_*)."""
    empty = {c for c in TABLE_METRICS if all(r[c] is None for r in rows)}
    columns = [c for c in rows[0] if c not in empty]

    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return "yes" if value else ""
        text = f"{value:.2f}" if isinstance(value, float) and 100 <= abs(value) < 1e5 else None
        text = text or (f"{value:.4g}" if isinstance(value, float) else str(value))
        return text.replace("|", "/").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def choose_best(
    spec: SweepSpec, trials: Sequence[Trial], rows: Sequence[dict], base: Params
) -> tuple[int | None, str]:
    """Index of the winning trial (or None) and why. Only complete trials of the base's
    likelihood and data variant compete: only their figures share a scale, and only such a
    model can be compared with the champion by the promotion gate."""
    sign = 1 if spec.goal == "min" else -1
    candidates = [
        (sign * row[spec.metric], t.index)
        for t, row in zip(trials, rows, strict=True)
        if row["status"] == "FINISHED" and row[spec.metric] is not None
        if same_family(t.params, base)
    ]
    if not candidates:
        return None, (
            f"no complete trial with a finite {spec.metric} and the base's model.likelihood="
            f"{base.model.likelihood} / train.data_variant={base.train.data_variant}"
        )
    word = "lowest" if spec.goal == "min" else "highest"
    return min(candidates)[1], f"{word} {spec.metric} among {len(candidates)} comparable trial(s)"


def _earlier_attempt(client: MlflowClient, experiment_id: str, key: str) -> Any | None:
    """The parent run of an earlier attempt of the same sweep (its key), newest first."""
    query = f"tags.`{TAG_KEY}` = '{key}' and tags.`sweep.role` = 'parent'"
    found = client.search_runs([experiment_id], query, order_by=["attributes.start_time DESC"])
    return found[0] if found else None


def _child_run(client: MlflowClient, ctx: dict, trial: Trial) -> str:
    """A SCHEDULED child run with the trial's full params (the same names on every child, so
    MLflow's compare view lines them up) and lineage, before the trial is submitted."""
    tags = ctx["tags"] | {
        "mlflow.parentRunId": ctx["parent_id"],
        "sweep.role": "trial",
        "sweep.trial": str(trial.index),
        TAG_TRIAL_KEY: trial.key,
        "sweep.overrides": " ".join(trial.override_strings()),
        "params.hash": trial.params.hash(),
    }
    name = ctx["name"] + trial.label
    with tracking.run_scope(
        client, ctx["experiment_id"], run_name=name, tags=tags, end_status="SCHEDULED"
    ) as child:
        overrides = " ".join([*ctx["overrides"], *trial.override_strings()])
        tracking.log_params(client, child.run_id, trial.params.flat())
        client.set_tag(child.run_id, "params.overrides", overrides)
        dataset = trial.params.data.dataset
        tracking.log_dataset(client, child.run_id, ctx["lineage"], ctx["processed"], dataset)
    return child.run_id


def _submit(client: MlflowClient, ctx: dict, todo: list[Trial], plan: dict) -> None:
    """Child runs for the trials to run (new, or interrupted ones reopened, where the trainer
    resumes from its checkpoint), then every trial through the flow's task runner."""
    run_ids = []
    for t in todo:
        run_id = plan[t.index][1]
        if run_id is None:
            run_id = _child_run(client, ctx, t)
        else:
            client.update_run(run_id, "SCHEDULED")
        run_ids.append(run_id)
    futures = run_trial.map(unmapped(ctx["root"]), todo, run_ids, unmapped(ctx["uri"]))
    for future, run_id in zip(futures, run_ids, strict=True):
        future.wait()
        state = future.state
        if not state.is_completed() and client.get_run(run_id).info.status == "SCHEDULED":
            # The task died without recording it (a lost worker, say): record it here.
            tracking.mark_failed(client, run_id, RuntimeError(state.message or state.type))


def _eval_dir(client: MlflowClient, root: str, run_id: str) -> str:
    """The trial's evaluation folder: on this disk when it ran here, else downloaded from the
    run's artifacts (a Dask worker on another machine)."""
    local = workspace.run_dir(root, run_id) / "evaluation"
    if (local / "per_example_nll.npy").is_file():
        return str(local)
    target = workspace.run_dir(root, run_id) / "downloaded"
    target.mkdir(parents=True, exist_ok=True)
    return client.download_artifacts(run_id, "evaluation", str(target))


def _register_and_gate(client: MlflowClient, ctx: dict, trial: Trial, row: dict) -> tuple:
    """The winner registered and sent through the gate, unless an earlier attempt of this
    sweep already did it for the same run. Returns (model, gate)."""
    parent_id, run_id, uri = ctx["parent_id"], row["run_id"], ctx["uri"]
    earlier = client.get_run(parent_id).data.tags
    if earlier.get("sweep.best_run_id", run_id) != run_id:  # a retried trial beat the winner
        client.set_tag(earlier["sweep.best_run_id"], "sweep.winner", "superseded")
    elif earlier.get("gate.decision"):
        model = {"name": earlier["sweep.model_name"], "version": earlier["sweep.model_version"]}
        gate = {"decision": earlier["gate.decision"], "reason": earlier.get("gate.reason", "")}
        return model, gate | {"from_earlier_attempt": True}
    client.set_tag(parent_id, "sweep.best_run_id", run_id)
    client.set_tag(parent_id, "sweep.best_trial", trial.label)
    run = client.get_run(run_id)  # the trial's lineage and figures, as a pipeline run has
    run_tags, figures = run.data.tags, run.data.metrics
    tags = {k: v for k, v in run_tags.items() if not k.startswith("mlflow.")}
    tags |= headline_tags(figures) | {"mlflow.run_id": run_id, "sweep.parent_run_id": parent_id}
    model = register(trial.params, run_id, uri, run_tags["sweep.model_uri"], tags, figures)
    client.set_tag(parent_id, "sweep.model_name", model["name"])
    client.set_tag(parent_id, "sweep.model_version", model["version"])
    eval_dir = _eval_dir(client, ctx["root"], run_id)
    gate = promote(ctx["root"], trial.params, uri, model["name"], model["version"], eval_dir)
    client.set_tag(run_id, "sweep.winner", "true")
    for target in (parent_id, run_id):
        client.set_tag(target, "gate.decision", gate.get("decision", ""))
        client.set_tag(target, "gate.reason", gate.get("reason", ""))
    return model, gate


@flow(name="vae-sweep", log_prints=True)
def sweep_flow(
    sweep_file: str,
    overrides: list[str],
    workdir: str,
    retry_failed: bool = False,
    dvc_remote: str | None = None,
) -> dict[str, Any]:
    """Prepare the data once, run every unfinished trial as a child run through the flow's
    task runner, tabulate, and send the best trial through registration and the gate."""
    root = Path(workdir).resolve()
    spec = load_sweep(root / sweep_file)
    trials = expand_trials(spec, load_params(root / workspace.PARAMS_NAME, overrides))
    client = tracking.connect(tracking.resolve_uri(root))
    tracking.ensure_reachable(client)  # an unreachable backend fails here, not after training
    holder = tracking.prefect_context() | {"workspace": str(root)}
    settle = partial(settle_dead_run, client=client)
    with workspace.exclusive(root, overrides, holder, settle) as base:
        lineage = refresh_data(root, base, dvc_remote)
        trials = with_keys(trials, lineage["processed_md5"])
        key = sweep_key(spec, trials)
        experiment_id = tracking.ensure_experiment(client, base.data.dataset, root)
        common = tracking.lineage_tags(base, lineage, root, "per trial")
        common |= {TAG_KEY: key, "sweep.name": spec.name}
        parent_tags = common | {
            "sweep.role": "parent",
            "sweep.method": spec.method,
            "sweep.metric": spec.metric,
            "sweep.goal": spec.goal,
            "sweep.num_trials": str(len(trials)),
            "sweep.file": str(root / sweep_file),
        }
        earlier = _earlier_attempt(client, experiment_id, key)
        attempt = 1 if earlier is None else int(earlier.data.tags.get("sweep.attempt", "1")) + 1
        with tracking.run_scope(
            client,
            experiment_id,
            run_id=earlier and earlier.info.run_id,
            run_name=f"sweep-{spec.name}-{key[:6]}",
            tags=parent_tags | {"sweep.attempt": str(attempt)},
        ) as parent:
            if earlier is not None and "failure.reason" in earlier.data.tags:
                client.delete_tag(parent.run_id, "failure.reason")  # the earlier attempt's: history
            ctx = {
                "root": str(root),
                "uri": client.tracking_uri,
                "tags": common,
                "parent_id": parent.run_id,
                "experiment_id": experiment_id,
                "name": f"{spec.name}-",
                "overrides": overrides,
                "lineage": lineage,
                "processed": workspace.processed_dir(root, base.data.dataset),
            }
            result = _sweep(client, ctx, spec, trials, base, retry_failed)
            if not result["counts"]["finished"]:
                parent.end_status = "FAILED"
    summary = result["summary_markdown"]
    create_markdown_artifact(summary, key="vae-sweep-summary", description=f"sweep {spec.name}")
    return result | {"sweep_key": key, "experiment_id": experiment_id}


def _sweep(
    client: MlflowClient,
    ctx: dict[str, Any],
    spec: SweepSpec,
    trials: list[Trial],
    base: Params,
    retry_failed: bool,
) -> dict[str, Any]:
    """Inside the parent run: the definition, the trials still to run, the table, the winner."""
    logger, parent_id = get_run_logger(), ctx["parent_id"]
    _log_definition(client, ctx, spec, trials, base)
    done = latest_by_trial(child_runs(client, ctx["experiment_id"], parent_id))
    existing = {k: (r.info.run_id, r.info.status, is_complete(r)) for k, r in done.items()}
    plan = plan_trials(trials, existing, retry_failed)
    todo = [t for t in trials if plan[t.index][0] not in REUSED]
    logger.info("sweep %s: %d trial(s), %d to run", spec.name, len(trials), len(todo))
    _submit(client, ctx, todo, plan)

    latest = latest_by_trial(child_runs(client, ctx["experiment_id"], parent_id))
    swept = list(dict.fromkeys(k for t in trials for k in t.overrides))
    rows = [trial_row(t, latest.get(t.key), swept, plan[t.index][0] in REUSED) for t in trials]
    counts = {
        "trials": len(trials),
        "finished": sum(r["status"] == "FINISHED" for r in rows),
        "failed": sum(r["status"] == "FAILED" for r in rows),
        "reused": len(trials) - len(todo),
        "ran": len(todo),
    }
    tracking.log_figures(client, parent_id, {f"sweep/{k}": v for k, v in counts.items()})
    client.log_text(parent_id, markdown_table(rows), "sweep_summary.md")  # should the gate fail
    index, why = choose_best(spec, trials, rows, base)
    client.set_tag(parent_id, "sweep.best_reason", why)
    model = gate = best = None
    if index is not None:
        best = rows[index]
        best_key = f"best/{spec.metric}"
        tracking.log_figures(client, parent_id, {best_key: best[spec.metric]})
        model, gate = _register_and_gate(client, ctx, trials[index], best)
        best["note"] = f"best: {model['name']} v{model['version']}, gate {gate['decision']}"
        headline = (
            f"**Winner: {best['trial']}** (run `{best['run_id']}`), {spec.metric} = "
            f"{best[spec.metric]:.4g}: {why}. Registered as `{model['name']}` version "
            f"{model['version']}; promotion gate **{gate['decision']}**: {gate.get('reason')}"
        )
    else:
        logger.warning("sweep %s: no winner: %s", spec.name, why)
        headline = f"No winner: {why}."
    table = markdown_table(rows)
    tally = ", ".join(f"{v} {k}" for k, v in counts.items())
    summary = f"# Sweep `{spec.name}`\n\nMLflow parent run `{parent_id}`: {tally}.\n\n{headline}"
    client.log_text(parent_id, f"{summary}\n\n{table}", "sweep_summary.md")
    if not counts["finished"]:  # the parent run ends FAILED (see sweep_flow)
        client.set_tag(parent_id, "failure.reason", "no trial finished")
    return {
        "sweep": spec.name,
        "parent_run_id": parent_id,
        "tracking_uri": ctx["uri"],
        "flow_run_id": str(runtime.flow_run.id),
        "metric": spec.metric,
        "counts": counts,
        "rows": rows,
        "best": best and {k: best[k] for k in ("trial", "run_id", spec.metric)} | {"reason": why},
        "model": model,
        "gate": gate,
        "table_markdown": table,
        "summary_markdown": f"{summary}\n\n{table}",
    }


def _log_definition(
    client: MlflowClient, ctx: dict[str, Any], spec: SweepSpec, trials: list[Trial], base: Params
) -> None:
    """The sweep's definition on its parent run: params (the base, the search space), its
    dataset and ``sweep/sweep.yaml`` (every trial's key and values, the data's md5)."""
    parent_id, lineage = ctx["parent_id"], ctx["lineage"]
    space = {f"sweep.space.{k}": yaml_scalar(v) for k, v in spec.parameters.items()}
    flat = base.flat() | {"overrides": " ".join(ctx["overrides"])} | space
    flat |= {"sweep.method": spec.method, "sweep.num_trials": str(len(trials))}
    have = client.get_run(parent_id).data.params  # params are immutable: log the new ones only
    tracking.log_params(client, parent_id, {k: v for k, v in flat.items() if k not in have})
    if not have:
        tracking.log_dataset(client, parent_id, lineage, ctx["processed"], base.data.dataset)
    definition = {
        "sweep": spec.to_dict(),
        "base_overrides": list(ctx["overrides"]),
        "data": {"processed_md5": lineage["processed_md5"], "raw_md5": lineage["raw_md5"]},
        "sweep_key": ctx["tags"][TAG_KEY],
        "trials": [
            {"index": t.index, "label": t.label, "key": t.key, "overrides": t.overrides}
            for t in trials
        ],
    }
    client.log_text(parent_id, yaml.safe_dump(definition, sort_keys=False), "sweep/sweep.yaml")


def run_sweep(
    sweep_file: str = "sweep.yaml",
    overrides: Sequence[str] = (),
    workdir: str = ".",
    *,
    max_workers: int | None = None,
    dask_address: str | None = None,
    dask_workers: int | None = None,
    retry_failed: bool = False,
    dvc_remote: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep on the task runner asked for; returns the flow's result. A bad
    sweep file, trial value or runner option is refused before Prefect starts."""
    root = Path(workdir).resolve()
    spec = load_sweep(root / sweep_file)
    expand_trials(spec, load_params(root / workspace.PARAMS_NAME, list(overrides)))
    runner = task_runner(max_workers, dask_address, dask_workers)
    run = sweep_flow.with_options(task_runner=runner, flow_run_name=f"sweep-{spec.name}")
    return run(str(root / sweep_file), list(overrides), str(root), retry_failed, dvc_remote)
