"""Batch scoring (`vae-pipeline score`, Prefect flow `batch-scoring`): the champion scores a
batch of new images as a job, and says whether the batch still looks like its training data.

The input is opened and checked before anything else (vae_core.scoring.inputs), the model is
rebuilt from the registry without unpickling (flows.model_io), and the images are scored in
parts of PART_IMAGES, one Prefect task each: in this process, or on a Dask cluster. Each part
streams its chunks into its own Parquet file; the parts are then copied, in order, into one
Parquet file written under a temporary name and renamed, so memory stays bounded whatever the
input's length and a failed run leaves no output behind.

Each run is an MLflow run in `vae-<dataset>-scoring`, tagged with the model version it used,
with the summary figures, a histogram of the scores beside the reference and a sample of rows
as an MLflow table. The drift decision (flows.drift) compares the batch's per-image NLLs with
the version's reference, its holdout NLLs; it is printed as `name value` lines and emitted as
a Prefect event (`vae.data.drift` or `vae.data.no-drift`) on the model version's resource.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from prefect import flow, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.task_runners import ThreadPoolTaskRunner

from flows import tracking
from flows.drift import DriftReport, DriftThresholds, compare
from flows.events import emit_model_event
from flows.params import DEFAULT_PATH, Params, load_params
from vae_core.atomic import default_mode
from vae_core.errors import VaeError

CHUNK_IMAGES = 1024  # images per call of the estimator
PART_IMAGES = 16_384  # images per task and per Parquet part
SAMPLE_ROWS = 100  # rows of the MLflow table
CHAMPION = "champion"
#: Version tags set at registration (flows.pipeline): where the reference NLLs are, and how
#: they were estimated.
TAG_REFERENCE = "drift.reference"
TAG_REFERENCE_K = "drift.reference_k"
NO_REFERENCE = "unavailable"


class ScoreError(VaeError, ValueError):
    """A model URI that does not resolve, or an output path that cannot be written."""


@dataclass(frozen=True)
class ModelChoice:
    """The model a run scores with: its URI and, for a registered one, its version."""

    uri: str
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    tags: dict[str, str] | None = None


@dataclass(frozen=True)
class ScoreColumns:
    """What the per-image figures are called. Likelihood names only for a likelihood
    (`vae_core.evaluation.report.likelihood_kind`): a Bernoulli decoder on grey levels gives an
    IWAE bound of a summed binary cross-entropy, and its columns say so."""

    log_px: str = "log_likelihood"
    neg_log_px: str = "nll"
    reconstruction: str = "reconstruction_nll"

    @property
    def axis_label(self) -> str:
        """What the histogram's axis calls the per-image figure."""
        return "NLL" if self == ScoreColumns() else self.neg_log_px


def score_columns(likelihood: str, data_variant: str) -> tuple[str, ScoreColumns]:
    """The model's likelihood kind and the names its figures get."""
    from vae_core.evaluation.report import likelihood_kind

    kind, _ = likelihood_kind(likelihood, data_variant)
    if kind.startswith("not_a_likelihood"):
        bound = "iwae_bound_not_a_likelihood"
        return kind, ScoreColumns(bound, f"neg_{bound}", "reconstruction_bce")
    return kind, ScoreColumns()


def resolve_model(client: Any, uri: str | None, default_name: str) -> ModelChoice:
    """`models:/<name>@<alias>` or `models:/<name>/<version>` (the registry's version, with its
    reference), or any other MLflow model URI or local folder (scored without a reference).
    Default: `models:/<default_name>@champion`."""
    uri = uri or f"models:/{default_name}@{CHAMPION}"
    if not uri.startswith("models:/") or uri.startswith("models:/m-"):
        return ModelChoice(uri)
    ref = uri.removeprefix("models:/")
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = ref.partition("/")
            mv = client.get_model_version(name, version)
    except MlflowException as exc:
        raise ScoreError(
            f"--model {uri}: expected a registered model version, found none "
            f"({exc.message.splitlines()[0]})"
        ) from exc
    return ModelChoice(uri, mv.name, str(mv.version), mv.run_id, dict(mv.tags))


def output_path(out: str | None, input_path: Path, workdir: Path) -> Path:
    path = Path(out) if out else workdir / "scores" / f"{input_path.stem}.parquet"
    if path.is_dir():
        raise ScoreError(
            f"--out {path}: expected a file path for the Parquet output, found a folder"
        )
    return path


# --------------------------------------------------------------------------- the work


@task(name="score-part", task_run_name="score-{start}-{stop}", cache_policy=NO_CACHE)
def score_part(
    input_path: str,
    model_dir: str,
    start: int,
    stop: int,
    settings: Any,
    columns: ScoreColumns,
    part_file: str,
) -> np.ndarray:
    """Score input positions start..stop-1 into `part_file` (Parquet); return their negated
    log-likelihoods (or bounds, see ScoreColumns)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.model_io import load_vae
    from vae_core.scoring.inputs import open_images
    from vae_core.scoring.score import score_images

    model = load_vae(model_dir)
    source = open_images(input_path)
    nlls: list[np.ndarray] = []
    writer = None
    try:
        for chunk in source.chunks(CHUNK_IMAGES, start, stop):
            first = start + sum(len(n) for n in nlls)
            scores = score_images(model, chunk.images, first, settings)
            frame = pd.DataFrame(
                {
                    "source_file": chunk.files,
                    "index": chunk.indices,
                    "position": np.arange(first, first + len(chunk), dtype=np.int64),
                    columns.log_px: scores.log_likelihood,
                    columns.neg_log_px: -scores.log_likelihood,
                    columns.reconstruction: scores.reconstruction_nll,
                    "latent_mean": list(scores.latent_mean),
                }
            )
            table = pa.Table.from_pandas(frame, preserve_index=False)
            writer = writer or pq.ParquetWriter(part_file, table.schema)
            writer.write_table(table)
            nlls.append(-scores.log_likelihood)
    finally:
        if writer is not None:
            writer.close()
    return np.concatenate(nlls)


def join_parts(part_files: list[str], out: Path) -> None:
    """Copy the parts, in order, into `out` through a temporary sibling renamed at the end."""
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    os.chmod(tmp, default_mode())  # readable as a plain open() would make it, not 0600
    try:
        writer = None
        for part in part_files:
            for batch in pq.ParquetFile(part).iter_batches():
                writer = writer or pq.ParquetWriter(tmp, batch.schema)
                writer.write_batch(batch)
        if writer is not None:
            writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- drift


def reference_nlls(
    client: Any, choice: ModelChoice, k: int, dst: Path
) -> tuple[np.ndarray | None, str]:
    """The version's holdout NLLs and where they came from, or (None, why not)."""
    if choice.version is None or choice.run_id is None:
        return None, f"{choice.uri} is not a registered model version: no reference"
    tags = choice.tags or {}
    location, ref_k = tags.get(TAG_REFERENCE), tags.get(TAG_REFERENCE_K)
    if not location or ref_k != str(k):
        why = (
            f"was estimated with k={ref_k}, this batch with evaluate.iwae_k={k}"
            if location and ref_k
            else f"is not recorded (no {TAG_REFERENCE} and {TAG_REFERENCE_K} tags)"
        )
        return None, f"the reference of v{choice.version} {why}: not comparable"
    run_id, _, path = location.removeprefix("runs:/").partition("/")
    try:
        local = client.download_artifacts(run_id, path, str(dst))
    except (MlflowException, OSError) as exc:
        return None, f"no reference at {location}: {exc}"
    return np.load(local, allow_pickle=False).astype(np.float64), location


def reference_tags(run_id: str, eval_metrics: dict, k: int) -> dict[str, str]:
    """The version tags that keep a new version's reference: its holdout's per-image NLLs,
    which the evaluation logged under `evaluation/` of its run (none without a holdout)."""
    name = eval_metrics.get("holdout_per_example_file")
    if not name:
        return {}
    return {TAG_REFERENCE: f"runs:/{run_id}/evaluation/{name}", TAG_REFERENCE_K: str(k)}


def drift_thresholds(params: Params) -> DriftThresholds:
    d = params.drift
    return DriftThresholds(
        alpha=d.alpha,
        min_mean_shift_nats=d.min_mean_shift_nats,
        max_tail_share=d.max_tail_share,
        bootstrap_samples=d.bootstrap_samples,
        confidence=d.confidence,
        seed=params.evaluate.seed,
    )


# --------------------------------------------------------------------------- logging


def summary_figures(
    nll: np.ndarray, recon_mean: float, seconds: float, columns: ScoreColumns = ScoreColumns()
) -> dict[str, float]:
    neg = columns.neg_log_px
    return {
        "score/images": float(len(nll)),
        f"score/mean_{neg}": float(nll.mean()),
        f"score/std_{neg}": float(nll.std()),
        f"score/median_{neg}": float(np.median(nll)),
        f"score/p99_{neg}": float(np.percentile(nll, 99)),
        f"score/mean_{columns.reconstruction}": recon_mean,
        "time/score_seconds": seconds,
        "time/images_per_second": len(nll) / seconds if seconds else 0.0,
    }


def histogram(nll: np.ndarray, reference: np.ndarray | None, title: str, what: str = "NLL"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    both = nll if reference is None else np.concatenate([nll, reference])
    low, high = np.percentile(both, 0.5), np.percentile(both, 99.5)
    # A batch far from the reference (inverted digits: 100x its NLLs) would squeeze the
    # reference into one bar: log-spaced bins on a log axis keep both readable.
    wide = low > 0 and high / low > 20
    bins = np.geomspace(low, high, 60) if wide else np.linspace(low, high, 60)
    if wide:
        ax.set_xscale("log")
    for values, label in ((nll, "this batch"), (reference, "reference")):
        if values is not None:  # each bar: the share of that set's images in the bin
            share = np.full(len(values), 1 / len(values))
            ax.hist(values, bins=bins, weights=share, alpha=0.6, label=f"{label} ({len(values):,})")
    ax.set(xlabel=f"per-image {what}, IWAE (nats)", ylabel="share of images", title=title)
    ax.legend()
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the flow


# One part at a time unless told otherwise (`vae-pipeline score --dask-*`): Prefect's default
# runner would start every part of a long input at once.
@flow(name="batch-scoring", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=1))
def batch_scoring(
    input_path: str,
    model: str | None = None,
    out: str | None = None,
    workdir: str = ".",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Score `input_path` with `model` (default the champion), write the Parquet table, log the
    run, decide drift and emit its event. Returns the summary, the drift figures and paths."""
    import pandas as pd

    from flows.model_io import load_vae_with_config
    from flows.registry import registered_model_name
    from vae_core.scoring.inputs import open_images

    root = Path(workdir)
    params = load_params(root / DEFAULT_PATH, overrides or [])
    source = open_images(input_path)  # bad input stops here, before any model or run
    destination = output_path(out, Path(input_path), root)
    client = tracking.connect(tracking.resolve_uri(root))
    choice = resolve_model(client, model, registered_model_name(params.data.dataset))
    experiment_id = tracking.ensure_experiment(client, f"{params.data.dataset}-scoring", root)
    tags = {
        "model.uri": choice.uri,
        "model.name": choice.name or "",
        "model.version": choice.version or "",
        "model.run_id": choice.run_id or "",
        "input.path": str(Path(input_path).resolve()),
        "input.kind": source.kind,
        **tracking.prefect_context(),
    }
    with (
        tempfile.TemporaryDirectory(prefix="vae-score-") as tmp,
        tracking.run_scope(
            client, experiment_id, run_name=f"score-{Path(input_path).stem}", tags=tags
        ) as scope,
    ):
        model_dir = Path(tmp) / "model"
        _, config = load_vae_with_config(choice.uri, dst_path=model_dir)  # no pickle
        settings = score_settings(params, str(config.get("data_variant", "binarized")))
        kind, columns = score_columns(
            str(config.get("likelihood", "bernoulli")), settings.data_variant
        )
        client.set_tag(scope.run_id, "score.kind", kind)
        tracking.log_params(
            client,
            scope.run_id,
            {f"score.{k}": v for k, v in asdict(settings).items()} | {"input.images": len(source)},
        )
        started = time.perf_counter()
        nll, parts = score_all(
            str(input_path), model_dir, settings, columns, len(source), Path(tmp)
        )
        seconds = time.perf_counter() - started
        join_parts(parts, destination)
        recon = pd.read_parquet(destination, columns=[columns.reconstruction])[
            columns.reconstruction
        ]
        figures = summary_figures(nll, float(recon.mean()), seconds, columns)

        reference, where = reference_nlls(client, choice, settings.k, Path(tmp) / "reference")
        report = (
            compare(reference, nll, drift_thresholds(params)) if reference is not None else None
        )
        decision, lines = drift_lines(report, where)
        print("\n".join(lines))
        if report is not None:
            figures |= {f"drift/{k.removeprefix('drift_')}": v for k, v in report.figures().items()}
        tracking.log_figures(client, scope.run_id, figures)
        reasons = " ".join(report.reasons) if report else where
        client.log_batch(
            scope.run_id,
            tags=[
                RunTag("drift.decision", decision),
                RunTag("drift.reference", where if report else NO_REFERENCE),
                RunTag("drift.reasons", reasons[:5000]),
            ],
        )
        _log_artifacts(
            client, scope.run_id, destination, nll, reference, choice, columns.axis_label
        )
        summary_rows = [{"figure": k, "value": f"{v:.6g}"} for k, v in figures.items()]
        summary_rows.append({"figure": "drift/decision", "value": decision})
        create_table_artifact(summary_rows, key="batch-scoring-summary", description=choice.uri)
        if report is not None and choice.name and choice.version:
            payload = {"decision": decision, "scoring_run_id": scope.run_id, **report.figures()}
            emit_model_event(report.event_name, choice.name, choice.version, payload)
    return {
        "run_id": scope.run_id,
        "out": str(destination),
        "model": {"uri": choice.uri, "name": choice.name, "version": choice.version},
        "figures": figures,
        "drift": decision,
        "drift_lines": lines,
    }


def score_settings(params: Params, data_variant: str) -> Any:
    """The estimator's settings: evaluate's k, seed and precision (resolved on the CPU, where
    the parts run), for the data variant the model was trained on."""
    from vae_core.scoring.score import ScoreSettings
    from vae_core.training.precision import resolve_precision

    precision = resolve_precision(params.evaluate.matmul_precision, torch.device("cpu")).name
    return ScoreSettings(params.evaluate.iwae_k, params.evaluate.seed, data_variant, precision)


def score_all(
    input_path: str, model_dir: Path, settings: Any, columns: ScoreColumns, n: int, tmp: Path
) -> tuple[np.ndarray, list[str]]:
    """Every part as a task on the flow's task runner (threads, or Dask): the NLLs in order,
    and the Parquet part files (tmp/part-NNNNN.parquet) in order."""
    ranges = [(lo, min(lo + PART_IMAGES, n)) for lo in range(0, n, PART_IMAGES)]
    parts = [str(tmp / f"part-{i:05d}.parquet") for i in range(len(ranges))]
    futures = [
        score_part.submit(input_path, str(model_dir), lo, hi, settings, columns, part)
        for (lo, hi), part in zip(ranges, parts, strict=True)
    ]
    return np.concatenate([future.result() for future in futures]), parts


def drift_lines(report: DriftReport | None, where: str) -> tuple[str, list[str]]:
    """The decision, and the `name value` lines the command prints (reasons last)."""
    if report is None:
        return NO_REFERENCE, [f"drift_decision {NO_REFERENCE}", f"drift_reason {where}"]
    return report.decision, report.lines() + [f"drift_reason {r}" for r in report.reasons]


def _log_artifacts(
    client: Any,
    run_id: str,
    destination: Path,
    nll: np.ndarray,
    reference: np.ndarray | None,
    choice: ModelChoice,
    what: str,
) -> None:
    """The histogram beside the reference and a sample of rows as an MLflow table."""
    import pandas as pd
    import pyarrow.parquet as pq

    title = f"{choice.name} v{choice.version}" if choice.version else choice.uri
    fig = histogram(nll, reference, title, what)
    client.log_figure(run_id, fig, "scores_histogram.png")
    import matplotlib.pyplot as plt

    plt.close(fig)
    first = next(pq.ParquetFile(destination).iter_batches(batch_size=SAMPLE_ROWS))
    sample = first.to_pandas().drop(columns=["latent_mean"])
    client.log_table(run_id, data=pd.DataFrame(sample), artifact_file="scores_sample.json")
