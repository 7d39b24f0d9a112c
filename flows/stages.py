"""DVC stage entry points: ``python -m flows.stages source|fetch|prepare``.

Each reads its section of params.yaml (overrides with ``-S key.sub=value``, like ``dvc exp run
-S``), takes its paths as arguments (defaults ``data/raw/<dataset>`` and
``data/processed/<dataset>``) and calls vae_core's data logic, so ``dvc repro`` and the Prefect
flow run the same code. A problem prints ``error: <message>`` on stderr, without a traceback,
and leaves the previous outputs as they were. The exit status tells the orchestrator whether
another try can help (flows.dvc_runner reads it back from DVC's message):

- 2 (EXIT_BAD_INPUT): the data or the parameters are wrong; the same input fails the same way.
- 75 (EXIT_UNAVAILABLE, sysexits' EX_TEMPFAIL): the source could not be reached this time; the
  fetch task's retries try again. The stage itself tries once.

Kept light on purpose: no prefect or mlflow import, so a stage starts in about a second.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flows.params import DEFAULT_PATH, Params, add_override_argument, load_params
from flows.workspace import processed_dir, raw_dir, source_file
from vae_core.data.errors import SourceUnavailable
from vae_core.errors import VaeError

EXIT_BAD_INPUT = 2
EXIT_UNAVAILABLE = 75


def run_source(params: Params, out: Path | None = None) -> dict[str, Any]:
    """The source stage: fingerprint the bytes behind data.source (always run, cheap); the
    file changes, and fetch re-runs, only when they changed."""
    from vae_core.atomic import atomic_write_text
    from vae_core.data.sources import source_fingerprint

    fingerprint = source_fingerprint(params.data.source, params.data.dataset)
    out = out if out is not None else source_file(".", params.data.dataset)
    atomic_write_text(out, json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    return fingerprint


def run_fetch(params: Params, out: Path | None = None) -> dict[str, Any]:
    """The fetch stage: ``params.data`` names source and dataset; one attempt (``params.fetch``
    is the orchestrator's retry policy, not the stage's). Returns the manifest."""
    from vae_core.data.sources import fetch_raw

    data = params.data
    return fetch_raw(
        data.source, data.dataset, out if out is not None else raw_dir(".", data.dataset)
    )


def prepare_metrics(stats: dict[str, Any]) -> dict[str, Any]:
    """The figures of ``stats.json`` that DVC shows as metrics: images per split and mean
    pixel value per split (scalars only; the per-class counts stay in stats.json)."""
    return {"counts": stats["counts"], "pixel_mean": stats["pixel_mean"]}


def run_prepare(
    params: Params, raw: Path | None = None, out: Path | None = None, metrics: Path | None = None
) -> dict[str, Any]:
    """The prepare stage: validate the raw files, split, binarize the test set, save. Returns
    the statistics written to ``stats.json``; with ``metrics``, also writes their figures there
    (dvc.yaml declares that file a metric, outside the cached data folder)."""
    from vae_core.atomic import atomic_write_text
    from vae_core.data.sources import dumps_json
    from vae_core.data.splits import load_raw, save_arrays, split_arrays

    data = params.data
    arrays, indices = split_arrays(
        *load_raw(raw if raw is not None else raw_dir(".", data.dataset)),
        val_size=data.val_size,
        holdout_size=data.holdout_size,
        split_seed=data.split_seed,
        binarize_seed=data.binarize_seed,
    )
    extra = {
        "dataset": data.dataset,
        "val_size": data.val_size,
        "holdout_size": data.holdout_size,
        "split_seed": data.split_seed,
        "binarize_seed": data.binarize_seed,
    }
    out = out if out is not None else processed_dir(".", data.dataset)
    stats = save_arrays(arrays, indices, out, extra_stats=extra)
    if metrics is not None:
        atomic_write_text(metrics, dumps_json(prepare_metrics(stats)) + "\n")
    return stats


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flows.stages", description="DVC stage entry points of the data pipeline."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--params", default=DEFAULT_PATH, help="parameters file (params.yaml)")
    add_override_argument(
        common, "override a parameter in memory, e.g. -S data.split_seed=1 (repeatable)"
    )
    sub = parser.add_subparsers(dest="stage", required=True)
    source = sub.add_parser("source", parents=[common], help="fingerprint data.source")
    source.add_argument("--out", type=Path, default=None, help="default: data/source/<ds>.json")
    fetch = sub.add_parser("fetch", parents=[common], help="bring the raw IDX files in")
    fetch.add_argument("--out", type=Path, default=None, help="default: data/raw/<dataset>")
    prepare = sub.add_parser("prepare", parents=[common], help="validate, split, save")
    prepare.add_argument("--raw", type=Path, default=None, help="default: data/raw/<dataset>")
    prepare.add_argument("--out", type=Path, default=None, help="default: data/processed/<dataset>")
    prepare.add_argument("--metrics", type=Path, default=None, help="also write the figures here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one stage; return 0 on success, EXIT_UNAVAILABLE when the source could not be
    reached, EXIT_BAD_INPUT on bad data or parameters (message on stderr)."""
    args = _parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        if args.stage == "source":
            files = run_source(params, args.out)["files"]
            print(f"source: {params.data.source}: {len(files)} file(s) fingerprinted")
        elif args.stage == "fetch":
            manifest = run_fetch(params, args.out)
            counts = manifest["counts"]
            print(
                f"fetch: {manifest['dataset']} from {manifest['source']}: "
                f"{counts['train']} train / {counts['test']} test images"
            )
            for split, label_counts in manifest["label_counts"].items():
                print(f"fetch: {split} label counts {' '.join(map(str, label_counts))}")
        else:
            stats = run_prepare(params, args.raw, args.out, args.metrics)
            c = stats["counts"]
            print(f"prepare: {c['train']} train / {c['val']} val / {c['test']} test images")
    except SourceUnavailable as exc:  # not the data's fault: worth another try
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    except VaeError as exc:  # bad data or parameters: the message says what and where
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
