"""`python3 -m experiments bench|reproduce|eval-bench|make-tiny-mnist`: the experiments' command
line, torch only (vae-pipeline's `bench` and `reproduce` are these same commands). Building the
parser imports neither torch nor MLflow; each command imports what it needs."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

from experiments.reproduce import (
    BURDA_EPOCHS,
    ENOUGH_EPOCHS,
    MIN_EPOCHS,
    ROWS,
    TEST_K,
    VAL_SIZE,
)
from vae_core.errors import VaeError

Subparsers = argparse._SubParsersAction


def print_figure(name: str, value: object, float_format: str = ".4g") -> None:
    """One `name value` line, flushed: a step stopped by its time limit keeps what it printed."""
    shown = format(value, float_format) if isinstance(value, float) else value
    print(f"{name} {shown}", flush=True)


# --------------------------------------------------------------------------- bench


def add_bench(sub: Subparsers) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark the trainer against the design document's loop",
        description="The design document's loop (torchvision, DataLoader, batch 64, on the CPU) "
        "against the project's trainer on the same MLP and data variant: samples per second "
        "(the first epoch, the warm-up, not counted), time to the reference's test -ELBO, and "
        "each rate as a fraction of this run's fp32 and bf16 matrix-product rates. Prints "
        "`name value` lines as they are measured.",
    )
    p.add_argument("--mnist-dir", type=Path, required=True, help="folder with the 4 IDX .gz files")
    p.add_argument("--reference-epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128, help="the project's batch size")
    p.add_argument("--max-epochs", type=int, default=30)
    p.add_argument(
        "--throughput-epochs",
        type=int,
        default=3,
        help="epochs of each throughput run; the first warms up and is not counted",
    )
    p.add_argument("--matmul-size", type=int, default=4096, help="of the peak-rate products")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true")


def run_bench(args: argparse.Namespace) -> int:
    from experiments.bench import run_bench

    run_bench(
        args.mnist_dir,
        args.reference_epochs,
        args.batch_size,
        args.max_epochs,
        args.device,
        args.compile,
        throughput_epochs=args.throughput_epochs,
        matmul_size=args.matmul_size,
        emit=print_figure,
    )
    return 0


# --------------------------------------------------------------------------- reproduce


def add_reproduce(
    sub: Subparsers,
    tracking_default: str = "$MLFLOW_TRACKING_URI; without one, or without mlflow, no logging",
) -> None:
    """The reproduce command; ``tracking_default`` says where runs go without --tracking-uri."""
    p = sub.add_parser(
        "reproduce",
        help="reproduce rows of Burda et al. 2015, Table 1 within a time budget",
        description="Dynamically binarized MNIST, test NLL by IWAE with k=5000 on all 10,000 "
        "test images. Each row's cost is measured first, then the rows that fit the budget "
        "(the whole command's wall time) are trained, each as one MLflow run in the experiment "
        "vae-reproduce when there is a tracking URI and mlflow is installed; prints a Markdown "
        "table beside the paper's figures and `name value` lines. Rows, in priority order: "
        + ", ".join(r.name for r in ROWS)
        + ".",
    )
    p.add_argument("--mnist-dir", type=Path, required=True, help="folder with the 4 IDX .gz files")
    p.add_argument("--budget-minutes", type=float, default=60.0, help="wall time of it all")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--rows", default=None, help="comma-separated, in priority order (default all)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help=f"MLflow tracking URI (default: {tracking_default})",
    )
    p.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="table and models")
    p.add_argument(
        "--max-epochs", type=int, default=BURDA_EPOCHS, help="per row (default: Burda's 3,280)"
    )
    p.add_argument(
        "--enough-epochs",
        type=int,
        default=ENOUGH_EPOCHS,
        help="what a row is trained for before the next row gets any time (default "
        f"{ENOUGH_EPOCHS}); rows run in priority order while each gets at least {MIN_EPOCHS}",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (default: torch's choice; 1 is often faster on a CPU that "
        "other jobs share)",
    )
    # For tests and smoke runs only: a cheaper estimator than the paper's (the table says which).
    p.add_argument("--test-k", type=int, default=TEST_K, help=argparse.SUPPRESS)
    p.add_argument("--test-size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--val-size", type=int, default=VAL_SIZE, help=argparse.SUPPRESS)


def run_reproduce(args: argparse.Namespace, started: float | None = None) -> int:
    """Print the table and the figures; exit 1 when no row could run. The budget counts from
    ``started`` (time.monotonic(); default now)."""
    started = time.monotonic() if started is None else started
    from experiments.reproduce import reproduce, select_rows

    rows = select_rows(args.rows)
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)
    outcome = reproduce(
        args.mnist_dir,
        budget_minutes=args.budget_minutes,
        rows=rows,
        device=args.device,
        tracking_uri=args.tracking_uri,
        out_dir=args.out,
        test_k=args.test_k,
        test_size=args.test_size,
        val_size=args.val_size,
        max_epochs=args.max_epochs,
        enough_epochs=args.enough_epochs,
        started=started,
    )
    print(outcome.table)
    for name, value in outcome.figures.items():
        print_figure(name, value, ".4f")
    return 0 if any(r.status == "ran" for r in outcome.results) else 1


# --------------------------------------------------------------------------- eval-bench


def add_eval_bench(sub: Subparsers) -> None:
    p = sub.add_parser(
        "eval-bench",
        help="time the IWAE evaluation of the default MLP VAE",
        description="Times iwae_nll at each --ks value on --test-size test images (and k=5000 "
        "on the whole test set when CUDA is present), after --train-epochs of training when "
        "given (random weights otherwise: only the timings mean something). --throughput: "
        "this machine's matmul rate, then one timed IWAE evaluation of a preset, as a fraction "
        "of it. Prints `name value` lines (see experiments/eval_bench.py).",
    )
    p.add_argument(
        "--mnist-dir",
        type=Path,
        default=None,
        help="folder of the four IDX files (default: the embedded subset)",
    )
    p.add_argument("--model-dir", type=Path, default=None, help="a saved model to time")
    p.add_argument("--train-epochs", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--ks", default="100,1000", help="importance samples of each timing (comma-separated)"
    )
    p.add_argument("--test-size", type=int, default=1000, help="test images of each timing")
    p.add_argument(
        "--precisions",
        default="fp32",
        help="fp32, bf16 or fp32,bf16: each timing in each, and with both the bf16-minus-fp32 "
        "difference per image (same importance samples): mean, standard error, largest",
    )
    p.add_argument(
        "--full", action="store_true", help="also k=5000 on all test images (always on CUDA)"
    )
    mode = p.add_argument_group("--throughput mode")
    mode.add_argument(
        "--throughput", action="store_true", help="matmul rate, then one timed IWAE evaluation"
    )
    # eval_bench.PRESETS' names (that module imports torch; building the parser must not)
    mode.add_argument("--preset", choices=("burda1", "burda2", "mlp"), default="mlp")
    mode.add_argument("--k", type=int, default=5000, help="importance samples per image")
    mode.add_argument("--images", type=int, default=200, help="test images to evaluate")
    mode.add_argument("--data", choices=("embedded", "random"), default="embedded")
    mode.add_argument("--matmul-size", type=int, default=4096)
    mode.add_argument("--matmul-repeats", type=int, default=2, help="per measurement point")
    mode.add_argument(
        "--segments", type=int, default=4, help="IWAE calls, each after a matmul measurement"
    )
    mode.add_argument(
        "--generic", action="store_true", help="force the generic path (the 'before' figures)"
    )


def run_eval_bench(args: argparse.Namespace) -> int:
    from experiments import eval_bench

    return eval_bench.throughput(args) if args.throughput else eval_bench.timings(args)


# --------------------------------------------------------------------------- recipe-search


def add_recipe_search(sub: Subparsers) -> None:
    p = sub.add_parser(
        "recipe-search",
        help="choose batch size, precision and learning rate for a time budget, on validation",
        description="Trains the default MLP VAE once per candidate (each batch size in each "
        "precision, lr * (batch / 128) ** e for each exponent e) for the same wall time, its "
        "learning rate decaying to the end of it, and prints each candidate's best validation "
        "-ELBO and the winner (see experiments/recipe_search.py). The test set is not read.",
    )
    p.add_argument("--mnist-dir", type=Path, required=True, help="folder with the 4 IDX .gz files")
    p.add_argument("--seconds", type=float, default=20.0, help="training time per candidate")
    p.add_argument("--batches", default="128,256,512,1024")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--lr", type=float, default=2e-3, help="the learning rate at batch 128")
    p.add_argument("--lr-exponents", default="0.5,1", help="lr * (batch / 128) ** e")
    p.add_argument("--data-variant", choices=("binarized", "continuous"), default="binarized")
    p.add_argument("--device", default="auto")


def run_recipe_search(args: argparse.Namespace) -> int:
    from experiments.recipe_search import candidates, search

    def numbers(text: str, kind: type) -> list:
        return [kind(part) for part in text.split(",") if part.strip()]

    pool = candidates(
        numbers(args.batches, int),
        [p.strip() for p in args.precisions.split(",") if p.strip()],
        numbers(args.lr_exponents, float),
        args.lr,
    )
    search(
        args.mnist_dir,
        args.seconds,
        pool,
        data_variant=args.data_variant,
        device=args.device,
        emit=print_figure,
    )
    return 0


# --------------------------------------------------------------------------- make-tiny-mnist


def add_make_tiny_mnist(sub: Subparsers) -> None:
    p = sub.add_parser(
        "make-tiny-mnist",
        help="write a tiny synthetic MNIST (four IDX files) for dry runs",
        description="Noisy copies of ten random binary templates, one per label: a VAE learns "
        "them in an epoch or two. Not MNIST: only for checking that the harnesses run.",
    )
    p.add_argument("folder", type=Path)
    p.add_argument("--train", type=int, default=2000, help="training images")
    p.add_argument("--test", type=int, default=200, help="test images")
    p.add_argument("--seed", type=int, default=0)


def run_make_tiny_mnist(args: argparse.Namespace) -> int:
    from experiments.tiny_mnist import write_idx_folder

    write_idx_folder(args.folder, args.train, args.test, seed=args.seed, learnable=True)
    print(f"wrote {args.folder}: {args.train} training and {args.test} test images (synthetic)")
    return 0


# --------------------------------------------------------------------------- the command

COMMANDS = {
    "bench": (add_bench, run_bench),
    "reproduce": (add_reproduce, run_reproduce),
    "eval-bench": (add_eval_bench, run_eval_bench),
    "recipe-search": (add_recipe_search, run_recipe_search),
    "make-tiny-mnist": (add_make_tiny_mnist, run_make_tiny_mnist),
}


def build_parser(
    prog: str = "python3 -m experiments", description: str | None = __doc__, commands=COMMANDS
) -> argparse.ArgumentParser:
    """A parser with one subcommand per entry of ``commands`` (name -> (add, run); an entry
    without ``add`` has its parser added by another's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    for add, _ in commands.values():
        if add is not None:
            add(sub)
    return parser


def _own_error(exc: Exception) -> VaeError | None:
    return exc if isinstance(exc, VaeError) else None


def main(
    argv: list[str] | None = None,
    *,
    parser: argparse.ArgumentParser | None = None,
    commands=COMMANDS,
    known_error: Callable[[Exception], Exception | None] = _own_error,
) -> int:
    """Run the subcommand; an error ``known_error`` knows (the project's own, by default) is
    one line `error: ...` and exit status 2, anything else keeps its traceback."""
    args = (parser or build_parser()).parse_args(argv)
    try:
        return commands[args.command][1](args)
    except Exception as exc:
        known = known_error(exc)
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        return 2
