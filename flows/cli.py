"""The `vae-pipeline` command. Heavy imports (Prefect, MLflow) happen inside each subcommand,
so `vae-pipeline train` starts in the time it takes to import torch."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a VAE on a data source and write metrics.json")
    p.add_argument("--source", default="embedded", help="'embedded', 'download' or an IDX folder")
    p.add_argument("--dataset", default="mnist", help="mnist, fashion-mnist or kmnist")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--data-variant", default="binarized", choices=["binarized", "continuous"])
    p.add_argument(
        "--likelihood", default="bernoulli", choices=["bernoulli", "continuous_bernoulli"]
    )
    p.add_argument("--architecture", default="mlp", choices=["mlp", "conv"])
    p.add_argument("--hidden-sizes", type=int, nargs="+", default=[400])
    p.add_argument("--latent-dim", type=int, default=20)
    p.add_argument("--beta", type=float, default=1.0)
    p.add_argument("--warmup-epochs", type=int, default=0)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--val-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the loss")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")


def _cmd_train(args: argparse.Namespace) -> int:
    from vae_core.data import load_splits
    from vae_core.training import TrainConfig, run_training

    splits = load_splits(args.source, args.dataset, val_size=args.val_size, split_seed=args.seed)
    model_config = {
        "architecture": args.architecture,
        "hidden_sizes": args.hidden_sizes,
        "latent_dim": args.latent_dim,
        "likelihood": args.likelihood,
    }
    train_config = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        beta=args.beta,
        warmup_epochs=args.warmup_epochs,
        patience=args.patience,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        data_variant=args.data_variant,
    )
    metrics = run_training(splits, model_config, train_config, args.out, resume=not args.no_resume)
    print(json.dumps(metrics, indent=2))
    return 0


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark the trainer against the design document's loop")
    p.add_argument("--mnist-dir", type=Path, required=True, help="folder with the 4 IDX .gz files")
    p.add_argument("--reference-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="the project's batch size")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")


def _cmd_bench(args: argparse.Namespace) -> int:
    from flows.bench import run_bench

    figures = run_bench(
        args.mnist_dir,
        args.reference_epochs,
        args.batch_size,
        args.max_epochs,
        args.device,
        args.compile,
    )
    for name, value in figures.items():
        print(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return 0


COMMANDS = {"train": (_add_train, _cmd_train), "bench": (_add_bench, _cmd_bench)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vae-pipeline", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except (ValueError, FileNotFoundError) as exc:
        # Bad input is the user's to fix: one clear line, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
