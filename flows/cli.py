"""The `vae-pipeline` command. Heavy imports (Prefect, MLflow) happen inside each subcommand,
so `vae-pipeline train` starts in the time it takes to import torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments import cli as experiments_cli
from flows.params import DEFAULT_PATH, add_override_argument, load_params
from flows.unresponsive import UNRESPONSIVE_AFTER_S
from vae_core.errors import VaeError


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a VAE from params.yaml (no DVC, no MLflow) and write metrics.json",
        description="Fetch data.source in memory, split it as the prepare stage does, train "
        "with the model and train sections, and score the test set once (one-sample ELBO). "
        "Rerun the same command after an interruption and it resumes from the checkpoint.",
    )
    add_override_argument(p, "override a parameter in memory, e.g. -S train.epochs=3")
    p.add_argument("--params", default=DEFAULT_PATH, help="parameters file (params.yaml)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")


def _cmd_train(args: argparse.Namespace) -> int:
    import torch

    from vae_core.atomic import atomic_write_text
    from vae_core.data import load_splits
    from vae_core.evaluation.likelihood import elbo_summary
    from vae_core.training import run_training
    from vae_core.training.run import VARIANT_LABELS, split_inputs

    params = load_params(args.params, args.overrides)
    data = params.data
    splits = load_splits(
        data.source,
        data.dataset,
        val_size=data.val_size,
        holdout_size=data.holdout_size,
        split_seed=data.split_seed,
        binarize_seed=data.binarize_seed,
    )
    outcome = run_training(splits, params.model, params.train, args.out, resume=not args.no_resume)
    x_test = split_inputs(splits, "test", params.train.data_variant)
    with torch.inference_mode():
        test = elbo_summary(outcome.model, x_test.to(outcome.metrics["device"]), seed=0)
    metrics = outcome.metrics | {
        "test_neg_elbo": test.neg_elbo,
        "test_neg_elbo_estimator": "ELBO, 1 sample of z per test image, analytic KL (nats)",
        "test_neg_elbo_data_variant": VARIANT_LABELS[params.train.data_variant],
        "test_size": len(x_test),
    }
    text = json.dumps(metrics, indent=2) + "\n"
    atomic_write_text(Path(args.out) / "metrics.json", text)
    print(text, end="")
    return 0


def _quiet_prefect_defaults() -> None:
    """No network here: keep Prefect from phoning home; respect anything the user set."""
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # The temporary server needs ~10 s on an idle 2-core machine; allow for a busy one.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the training pipeline flow with params.yaml")
    add_override_argument(p, "override a parameter, e.g. -S train.epochs=3")
    p.add_argument("--workdir", default=".", help="the project folder (params.yaml, dvc.yaml)")
    p.add_argument(
        "--force",
        action="store_true",
        help="train even when a version was made from the same data, params and model code",
    )
    _add_dvc_remote(p)


def _add_dvc_remote(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dvc-remote",
        default=None,
        metavar="NAME",
        help="a DVC remote the team shares: pull prepared data from it, push new data to it",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    _quiet_prefect_defaults()
    # Fail fast, before Prefect starts; the flow's own check reuses this parse (same bytes).
    load_params(Path(args.workdir) / DEFAULT_PATH, args.overrides)
    from flows.pipeline import training_pipeline

    result = training_pipeline(
        overrides=args.overrides, workdir=args.workdir, force=args.force, dvc_remote=args.dvc_remote
    )
    shown = ("run_id", "model", "figures", "gate")  # figures: nats per image, see the run
    print(json.dumps({k: result[k] for k in shown}, indent=2, default=str))
    return 0


def _model_name(args: argparse.Namespace) -> str:
    from flows.registry import registered_model_name

    if args.model_name:
        return args.model_name
    return registered_model_name(load_params(Path(args.workdir) / DEFAULT_PATH).data.dataset)


def _connect_mlflow(workdir: str) -> None:
    from flows import tracking

    tracking.connect(tracking.resolve_uri(Path(workdir)))


def _add_sample(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sample", help="draw a sample grid from a registered model")
    p.add_argument("--model", required=True, help="e.g. models:/mnist-vae@champion")
    p.add_argument("-n", "--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("samples.png"))
    p.add_argument("--workdir", default=".")


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from flows.model_io import load_vae
    from vae_core.evaluation.images import save_sample_grid

    _connect_mlflow(args.workdir)
    model = load_vae(args.model)
    images = model.sample(args.num, torch.Generator().manual_seed(args.seed))
    print(save_sample_grid(images, args.out))
    return 0


def _add_promote(sub: argparse._SubParsersAction) -> None:
    for name, help_text in (
        ("promote", "make a version champion by hand"),
        ("rollback", "point champion back at previous-champion"),
    ):
        p = sub.add_parser(name, help=help_text)
        if name == "promote":
            p.add_argument("version", help="the model version to promote")
        p.add_argument("--reason", required=True, help="why; recorded on the version")
        p.add_argument("--actor", default=None, help="who (default: $USER)")
        p.add_argument("--model-name", default=None, help="default: <data.dataset>-vae")
        p.add_argument("--workdir", default=".")


def _cmd_promote(args: argparse.Namespace) -> int:
    import getpass

    from flows import registry

    _connect_mlflow(args.workdir)
    actor = args.actor or getpass.getuser()
    name = _model_name(args)
    if args.command == "promote":
        change = registry.promote_version(name, args.version, args.reason, actor)
    else:
        change = registry.rollback(name, args.reason, actor)
    print(change)
    return 0


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the flow on a schedule (needs a Prefect server)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--cron", default="0 2 * * *", help="cron schedule (default nightly 02:00)")
    when.add_argument("--interval", type=float, default=None, help="seconds between runs")
    p.add_argument("--name", default="nightly", help="deployment name")
    p.add_argument(
        "--limit", type=int, default=1, help="flow runs at a time (they share one workspace)"
    )
    p.add_argument(
        "--on-overlap",
        choices=["enqueue", "cancel-new"],
        default="enqueue",
        help="a scheduled run that comes while one runs: wait its turn (default) or be cancelled",
    )
    p.add_argument(
        "--unresponsive-after",
        type=float,
        default=UNRESPONSIVE_AFTER_S,
        metavar="SECONDS",
        help="the server marks a run Crashed after this long without a heartbeat (default 90)",
    )
    add_override_argument(p, "override a parameter for every scheduled run")
    p.add_argument("--workdir", default=".")


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    _quiet_prefect_defaults()
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "error: PREFECT_API_URL is not set: start `prefect server start --host 127.0.0.1` "
            "and export PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    from flows.unresponsive import crash_unresponsive_runs, ensure_automation

    # A run whose process dies (this one killed, its machine lost) is marked Crashed by the
    # server after --unresponsive-after seconds without a heartbeat, which frees its slot.
    try:
        automation = crash_unresponsive_runs(args.unresponsive_after)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from flows.events import retrain_on_drift
    from flows.pipeline import training_pipeline

    done = ensure_automation(automation)
    silent = f"{args.unresponsive_after:g} s"
    print(f"automation {automation.name} {done}: a run silent for {silent} is marked Crashed")

    schedule = {"interval": args.interval} if args.interval else {"cron": args.cron}
    # One run at a time on the deployment, enforced by the Prefect server (the workspace's file
    # lock is the second line of defence): a run that arrives meanwhile is queued or cancelled.
    overlap = ConcurrencyLimitStrategy[args.on_overlap.upper().replace("-", "_")]
    training_pipeline.serve(
        name=args.name,
        parameters={"overrides": args.overrides, "workdir": str(Path(args.workdir).resolve())},
        limit=args.limit,
        global_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=overlap),
        triggers=[retrain_on_drift()],  # and on the clock: a run when a scored batch drifts
        **schedule,
    )
    return 0


def _add_dask(p: argparse.ArgumentParser) -> None:
    runner = p.add_mutually_exclusive_group()
    runner.add_argument(
        "--dask-address", default=None, metavar="tcp://HOST:PORT", help="an existing Dask cluster"
    )
    runner.add_argument(
        "--dask-workers", type=int, default=None, metavar="N", help="a local Dask cluster of N"
    )


def _add_score(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score a batch of images with the champion; decide drift",
        description="Per image: the IWAE log-likelihood (k = evaluate.iwae_k), the "
        "reconstruction error and the latent mean, into one Parquet file; an MLflow run in "
        "vae-<dataset>-scoring; the drift decision against the model version's holdout, "
        "printed as `name value` lines and emitted as a Prefect event. Bad input exits 2.",
    )
    p.add_argument(
        "--input",
        required=True,
        help="a .npy file of 28x28 images (uint8, or floats in [0, 1]), or a folder of IDX or "
        "PNG files",
    )
    p.add_argument("--model", default=None, help="an MLflow model URI (default: the champion)")
    p.add_argument("--out", default=None, help="the Parquet file (default scores/<input>.parquet)")
    _add_dask(p)
    add_override_argument(p, "override a parameter, e.g. -S evaluate.iwae_k=50")
    p.add_argument("--workdir", default=".", help="the project folder (params.yaml)")


def _cmd_score(args: argparse.Namespace) -> int:
    _quiet_prefect_defaults()
    from flows import tracking
    from flows.registry import registered_model_name
    from flows.scoring import batch_scoring, resolve_model
    from flows.sweep.flow import task_runner
    from vae_core.scoring.inputs import open_images

    # Fail fast, before Prefect starts: the parameters, the input's form and headers, the model.
    params = load_params(Path(args.workdir) / DEFAULT_PATH, args.overrides)
    open_images(args.input)
    client = tracking.connect(tracking.resolve_uri(Path(args.workdir)))
    resolve_model(client, args.model, registered_model_name(params.data.dataset))
    runner = task_runner(None, args.dask_address, args.dask_workers)
    result = batch_scoring.with_options(task_runner=runner)(
        input_path=args.input,
        model=args.model,
        out=args.out,
        workdir=args.workdir,
        overrides=args.overrides,
    )
    figures = result["figures"]
    print(f"scored {int(figures['score/images']):,} images with {result['model']['uri']}")
    print(f"wrote {result['out']} (MLflow run {result['run_id']})")
    for name, value in figures.items():
        if name.startswith("score/") or name.startswith("time/"):
            print(f"{name.replace('/', '_')} {value:.6g}")
    print("\n".join(result["drift_lines"]))
    return 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="run (or resume) a hyperparameter sweep: one MLflow child run per trial",
        description="Grid or random search over model.* and train.* keys (see sweep.yaml and "
        "docs/sweeps.md). Data are prepared once; finished trials are never run twice.",
    )
    p.add_argument("--sweep-file", default="sweep.yaml", help="relative to --workdir")
    p.add_argument("--max-workers", type=int, default=None, help="trials at once in threads")
    _add_dask(p)
    p.add_argument("--retry-failed", action="store_true", help="run failed trials again")
    _add_dvc_remote(p)
    add_override_argument(p, "override a base parameter for every trial, e.g. -S train.epochs=3")
    p.add_argument("--workdir", default=".", help="the project folder (params.yaml, dvc.yaml)")


def _cmd_sweep(args: argparse.Namespace) -> int:
    """Run the sweep; print the summary table and the winner. Exit 1 when no trial finished."""
    _quiet_prefect_defaults()
    from flows.sweep.flow import run_sweep

    result = run_sweep(
        args.sweep_file,
        args.overrides,
        args.workdir,
        max_workers=args.max_workers,
        dask_address=args.dask_address,
        dask_workers=args.dask_workers,
        retry_failed=args.retry_failed,
        dvc_remote=args.dvc_remote,
    )
    print(result["table_markdown"])
    best, model, gate = result["best"], result["model"], result["gate"] or {}
    if model:
        print(
            f"\nbest {best['trial']} ({result['metric']} {best[result['metric']]:.4g}) -> "
            f"{model['name']} v{model['version']}; gate {gate.get('decision')}: "
            f"{gate.get('reason')}"
        )
    else:
        print(f"\nno winner: {best or 'no comparable finished trial'}", file=sys.stderr)
    return 0 if result["counts"]["finished"] else 1


def _add_history(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("history", help="print every alias move of a registered model")
    p.add_argument("--model", dest="model_name", default=None, help="default: <data.dataset>-vae")
    p.add_argument("--workdir", default=".")


def _cmd_history(args: argparse.Namespace) -> int:
    from mlflow import MlflowClient

    from flows.alias_log import history_table, read_history

    _connect_mlflow(args.workdir)
    name = _model_name(args)
    from mlflow.exceptions import MlflowException

    from flows.registry import RegistryError

    try:
        entries = read_history(MlflowClient(), name)
    except MlflowException as exc:
        raise RegistryError(f"registered model {name!r} not found: {exc.message}") from None
    print(f"alias history of {name} ({len(entries)} moves)\n")
    print(history_table(entries), end="")
    return 0


def _add_reproduce(sub: argparse._SubParsersAction) -> None:
    experiments_cli.add_reproduce(sub, tracking_default="$MLFLOW_TRACKING_URI or ./mlflow.db")


def _cmd_reproduce(args: argparse.Namespace) -> int:
    """experiments' reproduce, logging to $MLFLOW_TRACKING_URI or ./mlflow.db by default."""
    import time

    started = time.monotonic()  # the budget counts from here, imports included
    _quiet_prefect_defaults()
    from flows.tracking import resolve_uri

    args.tracking_uri = args.tracking_uri or resolve_uri(Path.cwd())
    return experiments_cli.run_reproduce(args, started)


COMMANDS = {
    "train": (_add_train, _cmd_train),
    "bench": (experiments_cli.add_bench, experiments_cli.run_bench),
    "run": (_add_run, _cmd_run),
    "sample": (_add_sample, _cmd_sample),
    "promote": (_add_promote, _cmd_promote),
    "rollback": (None, _cmd_promote),
    "serve": (_add_serve, _cmd_serve),
    "history": (_add_history, _cmd_history),
    "sweep": (_add_sweep, _cmd_sweep),
    "score": (_add_score, _cmd_score),
    "reproduce": (_add_reproduce, _cmd_reproduce),
}


def build_parser() -> argparse.ArgumentParser:
    return experiments_cli.build_parser("vae-pipeline", __doc__, COMMANDS)


def main(argv: list[str] | None = None) -> int:
    # The project's own errors, and a tracking server's, say what to fix in one line; anything
    # else keeps its traceback.
    return experiments_cli.main(
        argv, parser=build_parser(), commands=COMMANDS, known_error=_known_error
    )


def _known_error(exc: Exception) -> VaeError | None:
    return exc if isinstance(exc, VaeError) else _tracking_server_error(exc)


def _tracking_server_error(exc: Exception) -> VaeError | None:
    """A tracking server's 403 (one line naming the account and the permission it lacks) or a
    server that stopped answering (one line, after MLflow's retries); MLflow is imported only
    when it is already in use."""
    if "mlflow" not in sys.modules:
        return None
    from flows.tracking import lost_server, permission_refusal

    return permission_refusal(exc) or lost_server(exc)


if __name__ == "__main__":
    sys.exit(main())
