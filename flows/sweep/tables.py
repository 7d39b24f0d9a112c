"""The sweep's summary: one row per trial, the winner, and the tables and run tree shown to a
person (markdown, CSV, an MLflow table)."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flows.sweep.records import (
    TAG_FAILURE,
    TAG_KEY,
    TAG_NAME,
    TAG_OVERRIDES,
    TAG_TRIAL,
    child_runs,
    is_complete,
)
from flows.sweep.spec import SELECTABLE_METRICS, SweepSpec
from flows.sweep.trials import Trial, same_family, yaml_scalar

#: Columns of the summary table: (column, metric key in the child run).
TABLE_METRICS: tuple[tuple[str, str], ...] = (
    ("val_neg_elbo", "train.best_val_neg_elbo"),
    ("test_neg_elbo", "test_neg_elbo"),
    ("test_nll_iwae", "test_nll_iwae"),
    ("sq_fd", "sq_fd"),
    ("sq_ref_fd", "sq_ref_fd"),
    ("sq_kid", "sq_kid"),
    ("sq_precision", "sq_precision"),
    ("sq_recall", "sq_recall"),
    ("epochs", "train.epochs"),
    ("images_per_s", "train.train_samples_per_second"),
)
TABLE_ARTIFACT = "sweep_summary.json"


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def trial_row(trial: Trial, run: Any | None, swept: Sequence[str], reused: bool) -> dict:
    """One line of the summary table, read back from the trial's child run."""
    row: dict[str, Any] = {"trial": trial.label}
    row |= {key: yaml_scalar(trial.overrides.get(key, "")) for key in swept}
    if run is None:
        status, metrics, tags = "NOT RUN", {}, {}
    else:
        status = run.info.status
        if status == "FINISHED" and not is_complete(run):
            status = "INCOMPLETE"
        metrics, tags = run.data.metrics, run.data.tags
    row["status"] = status
    for column, key in TABLE_METRICS:
        row[column] = _finite(metrics.get(key))
    for column in ("epochs", "images_per_s"):  # counts, not figures
        row[column] = None if row[column] is None else round(row[column])
    row["reused"] = reused
    row["run_id"] = run.info.run_id if run is not None else None
    row["note"] = tags.get(TAG_FAILURE, "")[:160]
    return row


def choose_best(
    spec: SweepSpec, trials: Sequence[Trial], rows: Sequence[dict], base: Mapping[str, Any]
) -> tuple[int | None, str]:
    """Index of the winning trial (or None) and why. Only complete trials of the base's
    likelihood and data variant compete: only their figures share a scale, and only such a
    model can be compared with the champion by the promotion gate."""
    column = spec.metric
    goal = spec.goal
    candidates = []
    for trial, row in zip(trials, rows, strict=True):
        value = row.get(column)
        if row["status"] == "FINISHED" and value is not None and same_family(trial.params, base):
            candidates.append((value if goal == "min" else -value, trial.index))
    if not candidates:
        return None, (
            f"no complete trial with a finite {column} and the base's model.likelihood="
            f"{base['model']['likelihood']} / train.data_variant={base['train']['data_variant']}"
        )
    _, index = min(candidates)
    word = "lowest" if goal == "min" else "highest"
    return index, f"{word} {column} among {len(candidates)} comparable complete trial(s)"


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.2f}" if abs(value) < 1e5 else f"{value:.4g}"
        return f"{value:.4g}"
    return str(value)


def table_columns(rows: Sequence[dict]) -> list[str]:
    cols = list(rows[0]) if rows else []
    # Drop metric columns no trial has (say, sample quality without a classifier).
    metric_cols = {c for c, _ in TABLE_METRICS}
    return [c for c in cols if c not in metric_cols or any(r.get(c) is not None for r in rows)]


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    columns = list(columns or table_columns(rows))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        cells = [_cell(row.get(c)).replace("|", "/").replace("\n", " ") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _log_table(client: Any, run_id: str, rows: Sequence[dict]) -> None:
    """The summary as an MLflow table (shown in the run's artifact view). `log_table` appends
    to an existing table, so a resumed sweep overwrites the file instead."""
    import tempfile

    import pandas as pd

    frame = pd.DataFrame(list(rows))
    existing = {f.path for f in client.list_artifacts(run_id)}
    if TABLE_ARTIFACT not in existing:
        client.log_table(run_id, data=frame, artifact_file=TABLE_ARTIFACT)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / TABLE_ARTIFACT
        frame.to_json(path, orient="split", index=False, date_format="iso")
        client.log_artifact(run_id, str(path))


def _log_summary(client: Any, run_id: str, rows: Sequence[dict]) -> str:
    """The table on the parent run as markdown, CSV and an MLflow table; returns the markdown."""
    table_md = markdown_table(rows)
    client.log_text(run_id, table_md, "sweep_summary.md")
    client.log_text(run_id, csv_table(rows), "sweep_summary.csv")
    _log_table(client, run_id, rows)
    return table_md


def format_run_tree(client: Any, parent_run_id: str, metric: str | None = None) -> str:
    """The parent run and its children as a tree, read back from MLflow."""
    parent = client.get_run(parent_run_id)
    tags = parent.data.tags
    metric = metric or tags.get("sweep.metric", "val_neg_elbo")
    key = SELECTABLE_METRICS.get(metric, (metric, "min"))[0]
    lines = [
        f"{parent.info.run_name}  {parent.info.run_id}  {parent.info.status}  "
        f"(sweep {tags.get(TAG_NAME)}, key {tags.get(TAG_KEY)}, "
        f"experiment {parent.info.experiment_id})"
    ]
    children = sorted(
        child_runs(client, parent.info.experiment_id, parent_run_id),
        key=lambda r: (int(r.data.tags.get(TAG_TRIAL, -1)), r.info.start_time or 0),
    )
    for i, run in enumerate(children):
        branch = "└─" if i == len(children) - 1 else "├─"
        m, t = run.data.metrics, run.data.tags
        shown = {metric: key, "test_nll_iwae": "test_nll_iwae", "sq_fd": "sq_fd"}
        figures = [f"{label}={_cell(m[mk])}" for label, mk in shown.items() if mk in m]
        extra = ""
        if t.get(TAG_FAILURE):
            extra = f"  reason: {t[TAG_FAILURE][:100]}"
        if run.info.run_id == tags.get("sweep.best_run_id"):
            extra += (
                f"  <- best: {tags.get('sweep.model_name')} v{tags.get('sweep.model_version')},"
                f" gate {tags.get('gate.decision')}"
            )
        done = "" if run.info.status != "FINISHED" or is_complete(run) else " (incomplete)"
        lines.append(
            f"{branch} {run.info.run_name}  {run.info.run_id}  {run.info.status}{done}  "
            f"{t.get(TAG_OVERRIDES, '')}  {' '.join(figures)}{extra}"
        )
    return "\n".join(lines)


def _summary_markdown(
    spec: SweepSpec,
    key: str,
    parent_id: str,
    counts: dict,
    table_md: str,
    best_row: dict | None,
    why: str,
    model: dict | None,
    gate: dict | None,
) -> str:
    goal = "lower" if spec.goal == "min" else "higher"
    lines = [
        f"# Sweep `{spec.name}` ({spec.method}, {counts['trials']} trials)",
        "",
        f"MLflow parent run `{parent_id}`, sweep key `{key}`. Winner by `{spec.metric}` "
        f"({goal} is better). {counts['finished']} finished, {counts['failed']} failed, "
        f"{counts['reused']} reused from an earlier attempt, {counts['ran']} run now.",
        "",
    ]
    if best_row is None:
        lines.append(f"No winner: {why}.")
    else:
        lines.append(
            f"**Winner: {best_row['trial']}** (run `{best_row['run_id']}`), "
            f"{spec.metric} = {_cell(best_row[spec.metric])}: {why}."
        )
        if model:
            lines.append(f"Registered as `{model['name']}` version {model['version']}.")
        if gate:
            lines.append(f"Promotion gate: **{gate.get('decision')}**: {gate.get('reason')}")
    lines += ["", table_md]
    return "\n".join(lines)
