"""`python3 -m experiments reproduce` (and `vae-pipeline reproduce`): rows of Burda et al. (2015),
Table 1, within a wall-time budget.

Dynamically binarized MNIST, test NLL by the IWAE estimator with k=5000 on all 10,000 test
images, as in the paper. The budget covers the whole command, so each row's cost is measured
first (a short training probe and a k=5000 evaluation of a few dozen test images), then a pure
planner (`plan_rows`) decides which rows fit and how many epochs each gets. Each row that runs
is one MLflow run when a tracking URI is given and mlflow is installed (experiments.tracking);
the result is a Markdown table beside the paper's figures.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vae_core.config import BURDA_ONE_LAYER, BURDA_TWO_LAYER, TrainConfig, VAEConfig
from vae_core.errors import VaeError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from experiments.tracking import Tracker
    from vae_core.data.splits import DatasetSplits

EXPERIMENT = "reproduce"  # MLflow experiment vae-reproduce (the pipeline's vae-<name> scheme)
TEST_K = 5000  # Burda et al.'s estimator: IWAE with k=5000 ...
TEST_SIZE = 0  # ... on every test image (0 = all)
VAL_SIZE = 1000  # carved from the 60,000 training images, for early stopping only
SEED = 0  # split, binarization, weights, noise and evaluation: one seed for every row
# Burda used batch 20 and lr 1e-3. Every row has a time budget, so it trains under
# train.recipe: budget (vae_core.training.recipe): this hardware's batch size and precision,
# LR scaled from batch 128 to that batch, decaying by LR_FINAL (Burda's span, 10x) to the end
# of the row's share of the budget.
LR, LR_FINAL = 2e-3, 0.1
# A probe epoch extrapolated to below this is timed again on the whole training set: a slice
# small enough to stay in the caches underestimated the MLP's epoch by 40% (2.1 s vs 3.45 s).
FULL_PROBE_BELOW_S = 15.0
# The floor: a row that cannot get this many epochs is not run (its figure would mean little,
# and its evaluation costs as much as a trained row's). Capped by --max-epochs.
MIN_EPOCHS = 30
# What a row takes before the next row gets any time: a row is trained this long (or to the
# end of the budget) whatever comes after it, so a faster machine never costs a row epochs.
ENOUGH_EPOCHS = 1000
ROW_OVERHEAD_S = 5.0  # building, saving, active units and MLflow logging of one row
SAFETY = 0.05  # share of the time left kept back for what the estimates miss
NOT_RUN = "not run (budget)"
# vae_core.training.schedule.BURDA_EPOCHS (a test checks they agree): importing it here would
# import torch, and the command line reads ROWS while it builds its parser.
BURDA_EPOCHS = 3280


class ReproduceError(VaeError, ValueError):
    """A bad argument of `reproduce`: an unknown row, a missing MNIST folder."""


# --------------------------------------------------------------------------- rows

_BURDA1, _BURDA2 = BURDA_ONE_LAYER, BURDA_TWO_LAYER


@dataclass(frozen=True)
class Row:
    """One row of the table: a model, an objective, and the paper's figure (None: no figure)."""

    name: str
    model: VAEConfig
    objective: str = "elbo"
    iwae_k: int = 1
    burda_nll: float | None = None

    @property
    def objective_label(self) -> str:
        return f"IWAE k={self.iwae_k}" if self.objective == "iwae" else "ELBO"

    @property
    def model_label(self) -> str:
        m = self.model
        sizes = [784, *m.hidden_sizes, m.latent_dim]
        if m.architecture == "mlp2":
            sizes += [*m.top_hidden_sizes, m.top_latent_dim]
            return f"{'-'.join(map(str, sizes))} {m.activation} (2 stoch.)"
        return f"{'-'.join(map(str, sizes))} {m.activation}"


#: In priority order: the design document's model first, then the ELBO baselines, then IWAE.
ROWS: tuple[Row, ...] = (
    Row("seed_mlp", VAEConfig()),
    Row("burda1_vae", _BURDA1, burda_nll=86.76),
    Row("burda2_vae", _BURDA2, burda_nll=85.33),
    Row("burda1_iwae5", _BURDA1, "iwae", 5, 85.54),
    Row("burda2_iwae5", _BURDA2, "iwae", 5, 83.89),
    Row("burda1_iwae50", _BURDA1, "iwae", 50, 84.78),
    Row("burda2_iwae50", _BURDA2, "iwae", 50, 82.90),
)


def select_rows(names: str | None) -> tuple[Row, ...]:
    """The rows a comma-separated --rows names, in its order (its priority); None: all."""
    if not names:
        return ROWS
    known = {row.name: row for row in ROWS}
    wanted = list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ReproduceError(
            f"--rows {names!r}: unknown row {', '.join(unknown) or '(none given)'}: expected "
            f"names from {', '.join(known)}"
        )
    return tuple(known[n] for n in wanted)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class RowCost:
    """Measured estimates: one epoch on the full training set (with its validation and
    checkpoints), and the test NLL."""

    name: str
    epoch_s: float
    eval_s: float


@dataclass(frozen=True)
class RowPlan:
    name: str
    epochs: int  # 0: not run
    lr_schedule: str = "exponential"
    max_minutes: float = 0.0  # the hard stop handed to the trainer
    reserved_s: float = 0.0  # what the row may cost at worst: train, one extra epoch, eval
    reason: str = ""

    @property
    def runs(self) -> bool:
        return self.epochs > 0


def _fixed_s(cost: RowCost, overhead_s: float) -> float:
    # The trainer stops after the epoch that passes max_minutes: one epoch may overrun.
    return cost.eval_s + overhead_s + cost.epoch_s


def plan_rows(
    costs: Sequence[RowCost],
    seconds_left: float,
    *,
    max_epochs: int = BURDA_EPOCHS,
    min_epochs: int = MIN_EPOCHS,
    enough_epochs: int = ENOUGH_EPOCHS,
    overhead_s: float = ROW_OVERHEAD_S,
    safety: float = SAFETY,
) -> tuple[RowPlan, ...]:
    """Which rows run in `seconds_left`, for how long, and why: the budget poured into the
    rows in priority order.

    Each row in turn, while it can get at least `min_epochs` (the floor: less training means
    nothing), takes the time for `enough_epochs` (capped at `max_epochs`) or all that is left,
    plus its evaluation; the first row that cannot reach the floor, and every row after it,
    is `not run (budget)`. So the budget is used whole (the last row that runs takes the rest,
    its learning rate decaying to the end of its own share), and a faster machine can only
    help: with cheaper epochs every row that ran runs again with at least as many epochs
    (rows before it need less time, never more), and rows are only ever added at the end.
    Burda's own schedule (3,280 epochs) for a row that gets that many, else an exponential
    one fitted to its share of time.
    """
    usable = max(0.0, seconds_left * (1.0 - safety))
    min_epochs = max(1, min(min_epochs, max_epochs))
    enough = max(min_epochs, min(enough_epochs, max_epochs))
    plans: list[RowPlan] = []
    left, blocked = usable, ""
    for cost in costs:
        epoch_s, fixed = max(cost.epoch_s, 1e-9), _fixed_s(cost, overhead_s)
        need = fixed + min_epochs * epoch_s
        if blocked:  # rows are only added at the end: a cheaper later row must not jump ahead
            plans.append(RowPlan(cost.name, 0, reason=f"{blocked} did not reach the floor"))
            continue
        if need > left:
            blocked = cost.name
            reason = (
                f"needs >= {_duration(need)} (test NLL ~{_duration(cost.eval_s)} + the floor of "
                f"{min_epochs} epochs and a spare one of ~{_duration(epoch_s)}), "
                f"{_duration(left)} left" + (" after the rows before it" if plans else "")
            )
            plans.append(RowPlan(cost.name, 0, reason=reason))
            continue
        train_s = min(enough * epoch_s, left - fixed)
        epochs = enough if train_s >= enough * epoch_s else int(train_s // epoch_s)
        why = (
            f"{epochs} epochs: enough ({enough})"
            if epochs >= enough
            else f"{epochs} epochs: the rest of the budget ({_duration(train_s)} of training)"
        )
        plans.append(
            RowPlan(
                cost.name,
                epochs,
                "burda" if epochs >= BURDA_EPOCHS else "exponential",
                max_minutes=train_s / 60.0,
                reserved_s=train_s + fixed,
                reason=why,
            )
        )
        left -= train_s + fixed
    return tuple(plans)


def train_config(row: Row, plan: RowPlan, device: str) -> TrainConfig:
    """The row's training settings under its plan."""
    return TrainConfig(
        objective=row.objective,
        iwae_k=row.iwae_k,
        lr=LR,
        lr_schedule=plan.lr_schedule,
        lr_final=LR_FINAL,
        epochs=plan.epochs,
        recipe="budget",
        # Early stopping only matters on long runs; a short budget's schedule is fitted to
        # its epochs and should run to its end.
        patience=max(10, plan.epochs // 10),
        max_minutes=max(plan.max_minutes, 1e-6),  # 0 would mean no limit
        device=device,
        seed=SEED,
    )


# --------------------------------------------------------------------------- the table


@dataclass
class RowResult:
    row: Row
    status: str  # "ran", NOT_RUN, or "failed: ..."
    epochs: int = 0
    train_s: float = 0.0
    device: str = "-"
    nll: float = math.nan
    nll_stderr: float = math.nan
    active_units: str = "-"
    eval_precision: str = "fp32"  # the test NLL's matrix products (its sums are float32/64)
    run_id: str = ""
    note: str = ""


def estimator_label(k: int, n: int) -> str:
    return f"k={k}, {n:,} images"


def results_table(results: Sequence[RowResult], k: int, n: int) -> str:
    """The Markdown table, the paper's figure beside each row's."""
    head = (
        "| row | model | objective | epochs | train s | device | "
        f"test NLL ({estimator_label(k, n)}) | Burda 2015 | active units |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in results:
        ran = r.status == "ran"
        nll = f"{r.nll:.2f} ± {r.nll_stderr:.2f} ({r.eval_precision})" if ran else r.status
        lines.append(
            f"| {r.row.name} | {r.row.model_label} | {r.row.objective_label} | "
            f"{r.epochs if ran else '-'} | {f'{r.train_s:.0f}' if ran else '-'} | "
            f"{r.device if ran else '-'} | {nll} | "
            f"{'-' if r.row.burda_nll is None else f'{r.row.burda_nll:.2f}'} | "
            f"{r.active_units if ran else '-'} |"
        )
    notes = [f"- {r.row.name}: {r.note}" for r in results if r.note]
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def figures(results: Sequence[RowResult]) -> dict[str, float | str]:
    """The `name value` lines: each row's test NLL, and the best row."""
    ran = [r for r in results if r.status == "ran"]
    out: dict[str, float | str] = {f"{r.row.name}_test_nll": r.nll for r in ran}
    best = min(ran, key=lambda r: r.nll, default=None)
    out["best_test_nll"] = best.nll if best else math.nan
    out["best_row"] = best.row.name if best else "none"
    return out


# --------------------------------------------------------------------------- measuring


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _log(message: str) -> None:
    print(f"[reproduce] {message}", file=sys.stderr, flush=True)


def load_mnist(mnist_dir: Path, val_size: int) -> DatasetSplits:
    """The official files split into train / val (seeded) and the untouched test set."""
    from vae_core.data import DataError, load_raw, make_splits
    from vae_core.data.sources import RAW_FILES

    folder = Path(mnist_dir).expanduser()
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise ReproduceError(
            f"--mnist-dir {folder}: expected a folder holding the four MNIST IDX files "
            f"({', '.join(RAW_FILES.values())}), found {found}"
        )
    try:
        arrays = load_raw(folder)
    except DataError as exc:
        raise ReproduceError(f"--mnist-dir {folder}: {exc}") from exc
    if (len(arrays[0]), len(arrays[2])) != (60_000, 10_000):
        _log(
            f"{folder} holds {len(arrays[0]):,} training and {len(arrays[2]):,} test images, "
            "not the official 60,000 / 10,000: the figures do not compare with the paper's"
        )
    splits, _ = make_splits(
        *arrays, val_size=val_size, split_seed=SEED, binarize_seed=SEED, holdout_size=0
    )
    return splits


def eval_precision(device: torch.device) -> str:
    """The test NLL's matrix products: evaluate.matmul_precision's default (auto) resolved on
    `device`; the log-weights and their log-sum-exp stay float32/float64 either way."""
    from vae_core.config import EvalConfig
    from vae_core.training.precision import resolve_precision

    return resolve_precision(EvalConfig().matmul_precision, device).name


def _sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_row(
    row: Row,
    splits: DatasetSplits,
    x_test: torch.Tensor,
    device: str,
    test_k: int,
    n_test: int,
    eval_cache: dict[VAEConfig, float],
    work_dir: Path,
    probe_batches: int = 5,
    probe_epochs: int = 4,
) -> RowCost:
    """Time a few short epochs on a slice of the training set (the first warms up; the median
    of the others, so one stall on a shared machine does not decide) and, once per
    architecture, `iwae_nll` on a few dozen test images; extrapolate both."""
    import dataclasses
    import statistics

    from vae_core.evaluation.likelihood import iwae_nll
    from vae_core.models.factory import build_vae
    from vae_core.training.device import pick_device
    from vae_core.training.recipe import apply_recipe
    from vae_core.training.trainer import Trainer

    # The row's own settings (its recipe's batch size and precision), for a few epochs.
    config = train_config(row, RowPlan(row.name, probe_epochs, max_minutes=60.0), device)
    config, _ = apply_recipe(dataclasses.replace(config, patience=0), pick_device(device))
    n_train = len(splits.train_images)

    def probe(n_images: int, epochs: int) -> tuple[Trainer, float]:
        """Seconds per epoch on the first `n_images`, with validation and checkpoints."""
        probe_config = dataclasses.replace(config, epochs=epochs)
        trainer = Trainer(build_vae(row.model, seed=SEED), probe_config, progress=False)
        stamps: list[float] = []
        result = trainer.fit(
            splits.train_images[:n_images],
            splits.val_images,
            checkpoint_dir=work_dir / f"{row.name}-{n_images}",
            callbacks=[lambda _: stamps.append(time.perf_counter())],
            resume=False,
        )
        timed = range(1, len(result.history))
        train_s = statistics.median(result.history[i]["epoch_seconds"] for i in timed)
        # What an epoch costs besides training: validation, checkpoints, the callbacks.
        fixed_s = statistics.median(
            stamps[i] - stamps[i - 1] - result.history[i]["epoch_seconds"] for i in timed
        )
        return trainer, train_s * n_train / n_images + max(0.0, fixed_s)

    trainer, epoch_s = probe(min(n_train, probe_batches * config.batch_size), probe_epochs)
    if epoch_s < FULL_PROBE_BELOW_S and n_train > probe_batches * config.batch_size:
        trainer, epoch_s = probe(n_train, 2)  # the warm-up epoch, then one timed
    if row.model not in eval_cache:
        model = trainer.model
        n_probe_eval = min(n_test, 24 if trainer.device.type == "cpu" else 256)
        x = x_test[:n_probe_eval].to(trainer.device)
        precision = eval_precision(trainer.device)
        iwae_nll(model, x[:1], test_k, seed=SEED, precision=precision)  # warm-up
        _sync(trainer.device)
        start = time.perf_counter()
        iwae_nll(model, x, test_k, seed=SEED, precision=precision)
        _sync(trainer.device)
        eval_cache[row.model] = (time.perf_counter() - start) * n_test / n_probe_eval
    return RowCost(row.name, epoch_s, eval_cache[row.model])


# --------------------------------------------------------------------------- running a row


def _count_active_units(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Burda's active units; for two stochastic layers, per layer (z1 from q(z1|x), z2 from
    the model's encode, q(z2 | E[z1|x]))."""
    from torch import nn

    from vae_core.evaluation.likelihood import active_units

    top, _ = active_units(model, x)
    if not hasattr(model, "q_z1"):
        return {"active_units": top}

    class FirstLayer(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def encode(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.inner.q_z1(xb)

    first, _ = active_units(FirstLayer(model), x)
    return {"active_units": first + top, "active_units_z1": first, "active_units_z2": top}


@dataclass(frozen=True)
class Settings:
    """What every row shares: where results go and how the test NLL is estimated."""

    tracker: Tracker
    out_dir: Path
    device: str
    test_k: int
    test_size: int
    n_test: int
    budget_minutes: float
    mnist_dir: Path


def run_row(
    row: Row,
    plan: RowPlan,
    cost: RowCost,
    splits: DatasetSplits,
    x_test: torch.Tensor,
    s: Settings,
) -> RowResult:
    """Train, evaluate and log one row as one MLflow run (FAILED with the reason if it fails);
    without a tracker the same, unlogged."""
    import torch

    from experiments.tracking import git_state
    from vae_core import figure_names
    from vae_core.evaluation.likelihood import iwae_nll
    from vae_core.training.run import VARIANT_LABELS, run_training

    cfg = train_config(row, plan, s.device)
    estimator = f"IWAE {estimator_label(s.test_k, s.n_test)} (test set)"
    tags = {
        "reproduce.row": row.name,
        "data.variant": VARIANT_LABELS["binarized"],
        "estimator": estimator,
        "reference": "Burda et al. 2015, Table 1"
        + ("" if row.burda_nll is None else f": {row.burda_nll} nats"),
        "data.source": str(Path(s.mnist_dir).resolve()),
        "torch.version": torch.__version__,
        "torch.threads": str(torch.get_num_threads()),
        **git_state(Path.cwd()),
    }
    with s.tracker.run(row.name, tags) as run:
        run.log_params(
            {
                "row": row.name,
                **{f"model.{k}": v for k, v in row.model.to_dict().items()},
                **{f"train.{k}": v for k, v in cfg.to_dict().items()},
                "eval.iwae_k": s.test_k,
                "eval.test_size": s.n_test,
                "eval.seed": SEED,
                "data.val_size": len(splits.val_images),
                "data.split_seed": SEED,
                "data.binarize_seed": SEED,
                "budget.minutes": s.budget_minutes,
                "plan.epoch_seconds": round(cost.epoch_s, 2),
                "plan.eval_seconds": round(cost.eval_s, 2),
            },
        )
        start = time.perf_counter()
        outcome = run_training(
            splits,
            row.model,
            cfg,
            s.out_dir / "rows" / row.name,
            callbacks=run.epoch_callbacks(figure_names.repeated_epoch_keys(cfg)),
            resume=False,  # a schedule fitted to this budget must not continue an older one
            progress=False,
        )
        train_s = time.perf_counter() - start
        model, device = outcome.model, str(outcome.metrics["device"])
        x = x_test.to(device)
        start = time.perf_counter()
        precision = eval_precision(torch.device(device))
        nll = iwae_nll(model, x, s.test_k, test_size=s.test_size, seed=SEED, precision=precision)
        eval_s = time.perf_counter() - start
        units = _count_active_units(model, x)
        run.log_figures(
            {
                "test/nll_iwae": nll.mean,
                "test/nll_iwae_stderr": nll.stderr,
                **{f"test/{k}": float(v) for k, v in units.items()},
                **figure_names.training_figures(outcome.metrics),
                "time/train_seconds": train_s,
                "time/eval_seconds": eval_s,
            }
        )
        flags = figure_names.stop_tags(outcome.metrics)
        if row.burda_nll is not None:
            flags["reference.burda2015_nll"] = f"{row.burda_nll:.2f}"
        run.set_tags(flags | {"device": device, "eval.matmul_precision_used": precision})
    return RowResult(
        row,
        "ran",
        epochs=int(outcome.metrics["epochs"]),
        train_s=train_s,
        device=device,
        nll=nll.mean,
        nll_stderr=nll.stderr,
        active_units=(
            f"{units['active_units_z1']}+{units['active_units_z2']}"
            if "active_units_z1" in units
            else str(units["active_units"])
        ),
        eval_precision=precision,
        run_id=run.run_id,
    )


# --------------------------------------------------------------------------- the command


@dataclass(frozen=True)
class Outcome:
    table: str
    figures: dict[str, float | str]
    results: tuple[RowResult, ...]


def reproduce(
    mnist_dir: Path,
    *,
    budget_minutes: float,
    rows: Sequence[Row] = ROWS,
    device: str = "auto",
    tracking_uri: str | None = None,
    out_dir: Path = Path("runs/reproduce"),
    test_k: int = TEST_K,
    test_size: int = TEST_SIZE,
    val_size: int = VAL_SIZE,
    max_epochs: int = BURDA_EPOCHS,
    enough_epochs: int = ENOUGH_EPOCHS,
    started: float | None = None,
    log: Callable[[str], None] = _log,
) -> Outcome:
    """Measure, plan, train and evaluate the rows within `budget_minutes` of wall time counted
    from `started` (time.monotonic(); default now); write the table into `out_dir`. Each row
    that runs is an MLflow run at `tracking_uri` (default $MLFLOW_TRACKING_URI) when mlflow is
    installed; otherwise `log` says once that nothing is logged."""
    import tempfile

    import torch

    from vae_core.atomic import atomic_write_text
    from vae_core.training.device import pick_device
    from vae_core.training.run import split_inputs

    started = time.monotonic() if started is None else started
    deadline = started + 60.0 * budget_minutes
    if budget_minutes <= 0 or test_k < 1 or test_size < 0 or max_epochs < 1:
        raise ReproduceError(
            "expected --budget-minutes > 0, --test-k >= 1, --test-size >= 0 and "
            f"--max-epochs >= 1, found {budget_minutes}, {test_k}, {test_size}, {max_epochs}"
        )
    try:
        resolved = str(pick_device(TrainConfig(device=device).device))
    except ValueError as exc:  # a malformed name (ConfigError) or a device this machine lacks
        raise ReproduceError(f"--device {device}: {exc}") from exc
    splits = load_mnist(mnist_dir, val_size)
    x_test = split_inputs(splits, "test", "binarized")
    n_test = len(x_test) if test_size == 0 else min(test_size, len(x_test))

    from experiments.tracking import open_tracker  # once the arguments are known to be good

    settings = Settings(
        open_tracker(tracking_uri, EXPERIMENT, Path.cwd(), log),
        Path(out_dir),
        resolved,
        test_k,
        test_size,
        n_test,
        budget_minutes,
        Path(mnist_dir),
    )

    costs: dict[str, RowCost] = {}
    eval_cache: dict[VAEConfig, float] = {}
    x_probe = x_test.to(resolved)
    with tempfile.TemporaryDirectory(prefix="vae-reproduce-probe-") as tmp:
        for row in rows:
            if time.monotonic() >= deadline:
                break  # rows left unmeasured do not run
            cost = measure_row(
                row, splits, x_probe, resolved, test_k, n_test, eval_cache, Path(tmp)
            )
            costs[row.name] = cost
            log(
                f"measured {row.name}: ~{cost.epoch_s:.1f} s per epoch, test NLL "
                f"({estimator_label(test_k, n_test)}) ~{_duration(cost.eval_s)}"
            )
    del x_probe
    plans = plan_rows(
        list(costs.values()),
        deadline - time.monotonic(),
        max_epochs=max_epochs,
        enough_epochs=enough_epochs,
    )
    by_name = {p.name: p for p in plans}
    for plan in plans:
        if plan.runs:
            log(
                f"plan {plan.name}: {plan.reason}; {plan.lr_schedule} lr, hard stop "
                f"after {_duration(60 * plan.max_minutes)} of training"
            )
        else:
            log(f"plan {plan.name}: {NOT_RUN}: {plan.reason}")

    results: list[RowResult] = []
    for i, row in enumerate(rows):
        plan = by_name.get(row.name)
        if plan is None or not plan.runs:
            note = plan.reason if plan else "not measured: the budget ran out while measuring"
            results.append(RowResult(row, NOT_RUN, note=note))
            continue
        # Earlier rows may have overrun their estimates: shrink this row's hard stop so the
        # rows after it keep their reservation, or skip it when not even one epoch is left.
        later = sum(by_name[r.name].reserved_s for r in rows[i + 1 :] if r.name in by_name)
        cost = costs[row.name]
        room = deadline - time.monotonic() - later - (plan.reserved_s - 60.0 * plan.max_minutes)
        if room < cost.epoch_s:
            results.append(RowResult(row, NOT_RUN, note="earlier rows overran their estimates"))
            log(f"skip {row.name}: {NOT_RUN}: earlier rows overran their estimates")
            continue
        if room < 60.0 * plan.max_minutes:
            plan = RowPlan(plan.name, plan.epochs, plan.lr_schedule, room / 60.0, plan.reserved_s)
        log(
            f"training {row.name}: {plan.epochs} epochs at most, {_duration(60 * plan.max_minutes)}"
        )
        try:
            result = run_row(row, plan, cost, splits, x_test, settings)
        except VaeError as exc:  # a diverged row should not cost the others their figures
            results.append(RowResult(row, f"failed: {type(exc).__name__}", note=str(exc)))
            log(f"{row.name} failed: {exc}")
            continue
        log(
            f"{row.name}: test NLL {result.nll:.2f} ± {result.nll_stderr:.2f} after "
            f"{result.epochs} epochs ({result.train_s:.0f} s)"
        )
        results.append(result)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    table = results_table(results, test_k, n_test)
    atomic_write_text(Path(out_dir) / "table.md", table)
    wall = {
        "wall_seconds": round(time.monotonic() - started, 1),
        "budget_seconds": 60.0 * budget_minutes,
    }
    return Outcome(table, figures(results) | wall, tuple(results))
