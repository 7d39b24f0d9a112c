"""The training loop: the whole data set lives on the device, and batches are sliced from it.

No DataLoader in the hot loop: MNIST fits in a few hundred MB, so one shuffled index tensor
per epoch replaces worker processes, collation and host-to-device copies.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vae_core.atomic import atomic_torch_save, remove_stale_temporaries
from vae_core.config import TrainConfig
from vae_core.errors import VaeError
from vae_core.estimators import iwae_log_likelihood
from vae_core.models.vae import VAE
from vae_core.objectives import beta_at, dataset_elbo, draw_noise, training_loss
from vae_core.training.checkpoint import (
    BEST_WEIGHTS_NAME,
    CHECKPOINT_NAME,
    load_checkpoint,
    read_state_dict,
)
from vae_core.training.device import pick_device
from vae_core.training.precision import resolve_precision
from vae_core.training.progress import ProgressBar
from vae_core.training.recipe import apply_recipe
from vae_core.training.schedule import lr_at

EpochCallback = Callable[[dict], None]
#: Images per forward pass when scoring a whole split (no gradients, so large is fine).
EVAL_BATCH_SIZE = 10_000


#: Settings that may differ between a checkpoint and the run that resumes it.
RESUME_MAY_CHANGE = (
    "epochs",
    "patience",
    "max_minutes",
    "device",
    "compile",
    "checkpoint_every_s",
    "matmul_precision",
)


class CheckpointMismatchError(VaeError, ValueError):
    """A checkpoint belongs to a run with other settings than the one resuming it."""


class NonFiniteLossError(VaeError, RuntimeError):
    """The loss became NaN or infinite; training stopped before applying that step."""


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    # What early stopping minimises on the validation split (`Trainer.validation_score`): the
    # -ELBO, or the -IWAE bound with train.iwae_k samples under the iwae objective.
    best_val_score: float = math.inf
    best_val_neg_elbo: float = math.inf  # the validation -ELBO of the kept weights
    best_val_neg_iwae: float | None = None  # their -IWAE bound (iwae objective only)
    epochs_completed: int = 0
    stopped_early: bool = False  # by early stopping on the validation split
    stopped_by_time: bool = False  # by train.max_minutes
    resumed_from_epoch: int = 0
    # Resumed on another kind of device (CPU <-> CUDA): the noise stream restarted from a seed
    # of the epoch, so the run is reproducible but not the same as one without the move.
    noise_reseeded: bool = False
    train_samples_per_second: float = 0.0
    device: str = "cpu"
    precision: str = "fp32"  # what the matrix products ran in (train.matmul_precision resolved)
    precision_reason: str = ""
    recipe: str = ""  # train.recipe's decision in words (vae_core.training.recipe)
    batch_size: int = 0  # what the run trained with (train.recipe: budget picks them)
    lr: float = 0.0


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) or (N, 1, 28, 28) -> float32 (N, 1, 28, 28) in [0, 1], on the device
    the images are on (move uint8 images first: a quarter of the bytes of float32)."""
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images.float().reshape(len(images), 1, 28, 28)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainer:
    """Fits a VAE with Adam; checkpoints every epoch and resumes from the last one."""

    def __init__(self, model: VAE, config: TrainConfig, progress: bool = True):
        self.progress = progress  # a progress bar per epoch on stderr
        self.device = pick_device(config.device)
        # train.recipe: budget replaces the batch size, lr and precision by this hardware's
        self.config, self.recipe = apply_recipe(config, self.device)
        config = self.config
        self.model = model.to(self.device)
        self.precision = resolve_precision(
            config.matmul_precision, self.device, config.batch_size, "train.matmul_precision"
        )
        # Fused Adam: one kernel for all parameters, on CUDA and on the CPU (about 20% more
        # images per second here for the default MLP at batch 128).
        fused = self.device.type in ("cuda", "cpu")
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=config.lr, fused=fused)
        # Fused Adam skips a step on the device when told its loss was not finite (what
        # torch.amp.GradScaler uses), so the loop never waits on the device to check a loss.
        self.skips_on_device = fused
        # Explicit generators make shuffling, binarization and eps resumable exactly.
        self.shuffle_gen = torch.Generator().manual_seed(config.seed)
        self.noise_gen = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        # The noise is drawn outside the loss, so the compiled graph has no seeded randn in it.
        self.loss_fn = torch.compile(training_loss) if config.compile else training_loss
        # Training time against train.max_minutes, across resumes (checkpoints carry it).
        self.clock: Callable[[], float] = time.perf_counter
        self.budget_seconds = self.last_epoch_seconds = 0.0

    def _autocast(self) -> contextlib.AbstractContextManager:
        return self.precision.autocast(self.device)

    def _state(self, epoch: int, result: TrainResult, since_best: int) -> dict:
        return {
            "epoch": epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "shuffle_rng": self.shuffle_gen.get_state(),
            "noise_rng": self.noise_gen.get_state().cpu(),
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_val_score": result.best_val_score,
            "best_val_neg_elbo": result.best_val_neg_elbo,
            "best_val_neg_iwae": result.best_val_neg_iwae,
            "epochs_since_best": since_best,
            "budget_seconds": self.budget_seconds,
            "last_epoch_seconds": self.last_epoch_seconds,
            "model_config": self.model.config.to_dict(),
            "train_config": self._resumable_settings(),
        }

    def _resumable_settings(self) -> dict:
        """The settings a checkpoint must share with the run that resumes it: all but those
        that may change between two halves of one training (how long, where, compiled)."""
        settings = self.config.to_dict()
        for key in RESUME_MAY_CHANGE:
            settings.pop(key)
        return settings

    def _check_same_run(self, state: dict, path: Path) -> None:
        """Refuse to resume another run's checkpoint: its optimizer state and history would
        silently replace this run's settings (the learning rate, for one)."""
        mine = {"model": self.model.config.to_dict(), "train": self._resumable_settings()}
        theirs = {"model": state.get("model_config"), "train": state.get("train_config")}
        differ = [
            f"{section}.{key}: checkpoint {(theirs[section] or {}).get(key)!r}, now {value!r}"
            for section, values in mine.items()
            for key, value in values.items()
            if (theirs[section] or {}).get(key) != value
        ]
        if differ:
            raise CheckpointMismatchError(
                f"{path}: this checkpoint was made with other settings ({'; '.join(differ)}): "
                "resume with the same settings, or start afresh (--no-resume / resume=False)"
            )

    def _restore(self, state: dict, result: TrainResult) -> int:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.shuffle_gen.set_state(state["shuffle_rng"])
        noise_state = state["noise_rng"].cpu()  # a CPU byte tensor, for a CUDA generator too
        if noise_state.numel() == self.noise_gen.get_state().numel():
            self.noise_gen.set_state(noise_state)
        else:  # written on another kind of device, whose generator's state does not fit here
            self.noise_gen.manual_seed(self.config.seed + 1 + int(state["epoch"]))
            result.noise_reseeded = True
        result.history = list(state["history"])
        result.best_epoch = int(state["best_epoch"])
        result.best_val_neg_elbo = float(state["best_val_neg_elbo"])
        result.best_val_neg_iwae = state.get("best_val_neg_iwae")
        # (Checkpoints written before the IWAE selection existed chose by the -ELBO.)
        result.best_val_score = float(state.get("best_val_score", result.best_val_neg_elbo))
        result.resumed_from_epoch = int(state["epoch"])
        self.budget_seconds = float(state.get("budget_seconds", 0.0))
        self.last_epoch_seconds = float(state.get("last_epoch_seconds", 0.0))
        return int(state["epochs_since_best"])

    def fit(
        self,
        train_images: torch.Tensor,
        val_images: torch.Tensor,
        checkpoint_dir: Path | None = None,
        callbacks: list[EpochCallback] | None = None,
        resume: bool = True,
    ) -> TrainResult:
        """Train for config.epochs epochs (or until early stopping) and keep the best weights.

        `val_images` are scored with a fixed binarization (binarized variant) and a fixed eps, so
        validation figures are comparable from epoch to epoch.
        """
        cfg = self.config
        callbacks = callbacks or []
        train_x = to_unit_float(train_images.to(self.device))
        val_x = self._fixed_validation_set(val_images)
        result = TrainResult(
            device=str(self.device),
            precision=self.precision.name,
            precision_reason=self.precision.reason,
            recipe=self.recipe,
            batch_size=self.config.batch_size,
            lr=self.config.lr,
        )
        self.budget_seconds = self.last_epoch_seconds = 0.0  # unless a checkpoint says more
        since_best = 0
        start_epoch = 0
        ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir else None
        if ckpt_path is not None:  # a write cut short by a killed run (last.pt is still whole)
            for name in (CHECKPOINT_NAME, BEST_WEIGHTS_NAME):
                remove_stale_temporaries(Path(checkpoint_dir) / name)
        if ckpt_path is not None and resume and ckpt_path.is_file():
            state = load_checkpoint(ckpt_path)
            self._check_same_run(state, ckpt_path)
            since_best = self._restore(state, result)
            start_epoch = result.resumed_from_epoch
        elif ckpt_path is not None and not resume:
            # A fresh start: an earlier run's best weights must not come back at the end.
            ckpt_path.unlink(missing_ok=True)
            (Path(checkpoint_dir) / BEST_WEIGHTS_NAME).unlink(missing_ok=True)

        n = len(train_x)
        seen, train_seconds = 0, 0.0
        best_weights: dict[str, torch.Tensor] | None = None  # not yet written to best.pt
        written_s, unsaved = self.budget_seconds, 0  # training time at the last checkpoint
        for epoch in range(start_epoch, cfg.epochs):
            if cfg.patience and since_best >= cfg.patience:
                result.stopped_early = True
                break
            beta = beta_at(epoch, cfg.beta, cfg.warmup_epochs)
            t0 = self.clock()
            train_loss, train_neg_elbo = self.train_epoch(train_x, epoch, beta)
            _synchronize(self.device)
            seconds = self.clock() - t0
            seen += n
            train_seconds += seconds
            self.count_epoch_time(seconds)

            metrics = {
                "epoch": epoch + 1,
                "beta": beta,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": train_loss,
                "train_neg_elbo": train_neg_elbo,
                **self._validate(val_x, epoch),
                "epoch_seconds": seconds,
                "samples_per_second": n / seconds,
            }
            result.history.append(metrics)
            score = self.validation_score(metrics)
            if score < result.best_val_score:
                result.best_val_score, result.best_epoch, since_best = score, epoch + 1, 0
                result.best_val_neg_elbo = metrics["val_neg_elbo"]
                result.best_val_neg_iwae = metrics.get("val_neg_iwae")
                if checkpoint_dir:
                    best_weights = {
                        k: v.detach().clone() for k, v in self.model.state_dict().items()
                    }
            else:
                since_best += 1
            unsaved = epoch + 1
            if ckpt_path is not None and self.budget_seconds - written_s >= cfg.checkpoint_every_s:
                self._save(ckpt_path, best_weights, unsaved, result, since_best)
                best_weights, written_s, unsaved = None, self.budget_seconds, 0
            for callback in callbacks:
                callback(metrics)
            if cfg.max_minutes and self.budget_seconds >= 60.0 * cfg.max_minutes:
                result.stopped_by_time = epoch + 1 < cfg.epochs
                break

        if ckpt_path is not None and unsaved:  # epochs since the last checkpoint (every_s > 0)
            self._save(ckpt_path, best_weights, unsaved, result, since_best)
        result.epochs_completed = len(result.history)
        if cfg.patience and since_best >= cfg.patience and result.epochs_completed < cfg.epochs:
            result.stopped_early = True
        result.train_samples_per_second = seen / train_seconds if train_seconds else 0.0
        self._load_best(checkpoint_dir)
        return result

    def _save(
        self,
        ckpt_path: Path,
        best_weights: dict[str, torch.Tensor] | None,
        epoch: int,
        result: TrainResult,
        since_best: int,
    ) -> None:
        """The best weights found since the last checkpoint, then the resume checkpoint: a
        kill between the two leaves best.pt newer than last.pt, which resuming recomputes."""
        if best_weights is not None:
            atomic_torch_save(best_weights, ckpt_path.parent / BEST_WEIGHTS_NAME)
        atomic_torch_save(self._state(epoch, result, since_best), ckpt_path)

    def count_epoch_time(self, seconds: float) -> None:
        """Add an epoch's training time to the budget's clock (`fit` does; a loop that calls
        `train_epoch` itself must too, or a time budget's schedule never moves)."""
        self.budget_seconds += seconds
        self.last_epoch_seconds = seconds

    def budget_spent_by_end_of_epoch(self) -> float:
        """The share of train.max_minutes spent once the coming epoch ends, if it takes as
        long as the last one did (0 without a budget): what a budgeted schedule follows."""
        if not self.config.max_minutes:
            return 0.0
        expected = self.budget_seconds + self.last_epoch_seconds
        return expected / (60.0 * self.config.max_minutes)

    def train_epoch(self, train_x: torch.Tensor, epoch: int, beta: float) -> tuple[float, float]:
        cfg = self.config
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(epoch, cfg, self.budget_spent_by_end_of_epoch())
        n = len(train_x)
        order = torch.randperm(n, generator=self.shuffle_gen).to(self.device)
        if cfg.data_variant == "binarized":
            # Dynamic binarization: a fresh Bernoulli draw of every image each epoch.
            epoch_x = torch.bernoulli(train_x, generator=self.noise_gen)
        else:
            epoch_x = train_x
        steps = math.ceil(n / cfg.batch_size)
        bar = ProgressBar(steps, f"epoch {epoch + 1}/{cfg.epochs}", enabled=self.progress)
        # Each step's loss stays on the device until the epoch ends: one wait per epoch.
        losses = torch.empty(steps, device=self.device, dtype=torch.float32)
        neg_elbo_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        # A tensor, not a float: one compiled graph for every KL weight of a warm-up.
        beta_t = torch.tensor(beta, dtype=torch.float32, device=self.device)
        for step in range(steps):
            x = epoch_x[order[step * cfg.batch_size : (step + 1) * cfg.batch_size]]
            eps = self._noise(len(x))
            # The shorter last batch runs eager: a compiled graph for its shape would cost
            # another compilation (20-60 s on CUDA) for one step an epoch.
            loss_fn = training_loss if cfg.compile and len(x) < cfg.batch_size else self.loss_fn
            with self._autocast():
                loss, bound = loss_fn(self.model, x, eps, beta_t, cfg.objective)
            non_finite = ~torch.isfinite(loss.detach())
            if not self.skips_on_device and non_finite:  # waits on the device (mps only)
                self._raise_non_finite(loss.detach().reshape(1), epoch, first_step=step)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.skips_on_device:
                self.optimizer.found_inf = non_finite.float()  # 1: the step is not applied
            self.optimizer.step()
            losses[step] = loss.detach()
            neg_elbo_sum += -bound.sum()
            bar.update(step + 1)
        if not bool(torch.isfinite(losses).all()):
            self._raise_non_finite(losses, epoch)
        sizes = torch.full((steps,), cfg.batch_size, dtype=torch.float64, device=self.device)
        sizes[-1] = n - (steps - 1) * cfg.batch_size
        train_loss = float((losses.double() * sizes).sum()) / n
        bar.close(f"loss {train_loss:.2f}")
        return train_loss, float(neg_elbo_sum) / n

    @staticmethod
    def _raise_non_finite(losses: torch.Tensor, epoch: int, first_step: int = 0) -> None:
        """The first non-finite loss of `losses` (the losses from step `first_step` on)."""
        i = int((~torch.isfinite(losses)).nonzero()[0])
        raise NonFiniteLossError(
            f"training loss became {float(losses[i])} at epoch {epoch + 1}, step "
            f"{first_step + i + 1}; "
            "no step with a non-finite loss was applied, and the epoch was not saved (try a "
            "lower train.lr)"
        )

    def _validate(self, val_x: torch.Tensor, epoch: int) -> dict[str, float]:
        """The validation figures of one epoch, with fixed noise: the -ELBO and its two terms,
        and under the iwae objective the -IWAE bound with train.iwae_k samples as well."""
        val = dataset_elbo(self.model, val_x, EVAL_BATCH_SIZE, self._eval_generator())
        figures = {
            "val_neg_elbo": float(-val.elbo.mean()),
            "val_recon": float(-val.log_px_z.mean()),
            "val_kl": float(val.kl.mean()),
        }
        if self.config.objective == "iwae" and self.config.iwae_k > 1:
            bound = iwae_log_likelihood(self.model, val_x, self.config.iwae_k, seed=self._eval_seed)
            figures["val_neg_iwae"] = float(-bound.mean())
        for name, value in figures.items():
            if not math.isfinite(value):
                what = "-IWAE bound" if name == "val_neg_iwae" else "-ELBO"
                raise NonFiniteLossError(
                    f"validation {what} became {value} after epoch {epoch + 1}; stopped "
                    "before saving that epoch (try a lower train.lr)"
                )
        return figures

    @staticmethod
    def validation_score(figures: dict) -> float:
        """What early stopping and the kept weights minimise: the objective the model is
        trained for, on the validation split. An IWAE-trained model has a looser ELBO than a
        VAE but a tighter IWAE bound, and the epoch with the best ELBO need not be its best."""
        return figures.get("val_neg_iwae", figures["val_neg_elbo"])

    def _noise(self, batch: int) -> torch.Tensor:
        """eps for one step: (B, noise_dim) for the ELBO, (B, k, noise_dim) for the IWAE bound."""
        if self.config.objective == "iwae":
            return draw_noise(self.model, batch, self.config.iwae_k, self.device, self.noise_gen)
        return draw_noise(self.model, batch, 1, self.device, self.noise_gen).squeeze(1)

    def _fixed_validation_set(self, val_images: torch.Tensor) -> torch.Tensor:
        val_x = to_unit_float(val_images.to(self.device))
        if self.config.data_variant == "binarized":
            gen = torch.Generator(device=self.device).manual_seed(self.config.seed + 2)
            val_x = torch.bernoulli(val_x, generator=gen)
        return val_x

    @property
    def _eval_seed(self) -> int:
        """The validation noise's seed: the same every epoch, so figures compare."""
        return self.config.seed + 3

    def _eval_generator(self) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self._eval_seed)

    def _load_best(self, checkpoint_dir: Path | None) -> None:
        best = Path(checkpoint_dir) / BEST_WEIGHTS_NAME if checkpoint_dir else None
        if best is not None and best.is_file():
            self.model.load_state_dict(read_state_dict(best))
        self.model.eval()
