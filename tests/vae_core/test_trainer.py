"""The trainer: learning, exact resume, early stopping by the trained objective, refusing a
non-finite loss, the views of the data it feeds, the KL warm-up and the learning-rate schedule
(with an injected clock for the time budget)."""

import shutil
from functools import partial
from itertools import count
from types import SimpleNamespace

import pytest
import torch
from helpers import TWO_LAYER

from vae_core.evaluation.likelihood import iwae_log_likelihood
from vae_core.models import VAEConfig, build_vae
from vae_core.objectives import dataset_elbo, iwae_bound
from vae_core.training import (
    EVAL_BATCH_SIZE,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    load_checkpoint,
    run_training,
    to_unit_float,
)
from vae_core.training.trainer import CheckpointMismatchError

SMALL = VAEConfig(hidden_sizes=[64], latent_dim=4)
TINY = VAEConfig(hidden_sizes=[8], latent_dim=2)
WIDE = VAEConfig(hidden_sizes=[256], latent_dim=8)  # overfits sixteen images in a few epochs


def _images(n: int, seed: int) -> torch.Tensor:
    """Blocky synthetic digits: structure a VAE can learn in one or two epochs."""
    gen = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, 1, 7, 7, generator=gen) > 0.6).float()
    return (torch.nn.functional.interpolate(coarse, scale_factor=4) * 255).to(torch.uint8)[:, 0]


def _config(**overrides) -> TrainConfig:
    values = dict(epochs=3, batch_size=32, seed=0, device="cpu", patience=0)
    return TrainConfig(**(values | overrides))


def _trainer(config: VAEConfig = SMALL, seed: int = 0, **overrides) -> Trainer:
    """A trainer of a seeded model: its weights do not depend on the tests run before."""
    return Trainer(build_vae(config, seed=seed), _config(**overrides), progress=False)


def _stop_after(epoch: int):
    """An epoch callback that interrupts training once `epoch` is done (and checkpointed)."""

    def callback(metrics):
        if metrics["epoch"] == epoch:
            raise KeyboardInterrupt

    return callback


def test_training_lowers_validation_loss_and_reports_each_epoch(tmp_path):
    seen, trainer = [], _trainer()
    result = trainer.fit(_images(512, 0), _images(128, 1), tmp_path, callbacks=[seen.append])
    assert [m["epoch"] for m in seen] == [1, 2, 3] and seen == result.history
    assert seen[-1]["val_neg_elbo"] < seen[0]["val_neg_elbo"]
    assert result.epochs_completed == 3 and result.train_samples_per_second > 0
    assert (tmp_path / "last.pt").is_file()
    # The elbo objective is chosen by the validation -ELBO alone: no IWAE bound computed.
    assert all("val_neg_iwae" not in m for m in result.history)
    assert result.best_val_neg_iwae is None
    assert result.best_val_score == result.best_val_neg_elbo
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(trainer.model.state_dict()[k].cpu(), v) for k, v in best.items())


def test_resume_after_interruption_gives_identical_weights_and_refuses_other_settings(tmp_path):
    train, val, folder = _images(256, 0), _images(64, 1), tmp_path / "resumed"
    reference = _trainer()
    reference.fit(train, val, tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        _trainer().fit(train, val, folder, [_stop_after(1)])
    assert load_checkpoint(folder / "last.pt")["epoch"] == 1
    resumed = _trainer()
    result = resumed.fit(train, val, folder)
    assert result.resumed_from_epoch == 1 and result.epochs_completed == 3
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    # A checkpoint made with other settings is refused; more epochs (and a new patience) is
    # what resuming is for: allowed.
    refused = r"last.pt: .*train.lr: checkpoint 0.002, now"
    with pytest.raises(CheckpointMismatchError, match=refused):
        _trainer(epochs=4, lr=3e-3).fit(train, val, folder)
    result = _trainer(epochs=4, patience=3).fit(train, val, folder)
    assert result.resumed_from_epoch == 3 and result.epochs_completed == 4
    # A fresh start (resume=False) never brings back that run's best weights.
    assert (folder / "best.pt").is_file()
    fresh = _trainer(seed=5, epochs=0)
    initial = {k: v.clone() for k, v in fresh.model.state_dict().items()}
    fresh.fit(train, val, folder, resume=False)
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in initial.items())
    assert not (folder / "best.pt").exists()


def test_a_non_finite_training_or_validation_loss_stops_before_the_step_or_save(tmp_path):
    trainer = _trainer()
    with torch.no_grad():
        trainer.model.decoder.net[-1].bias.fill_(float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        trainer.fit(_images(64, 0), _images(16, 1), tmp_path)
    # No Adam step was applied (fused Adam skipped each one on the device).
    assert all(int(s["step"]) == 0 for s in trainer.optimizer.state.values())
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]) or torch.isnan(tensor).all(), name
    assert not (tmp_path / "last.pt").exists()
    # A non-finite validation loss stops training before that epoch is saved.
    val = _images(16, 1).float() / 255.0
    val[0, 0, 0] = float("nan")  # no finite -ELBO can come out of this validation set
    with pytest.raises(NonFiniteLossError, match="validation -ELBO became nan after epoch 1"):
        _trainer(data_variant="continuous").fit(_images(64, 0), val, tmp_path / "v")
    assert not (tmp_path / "v" / "best.pt").exists() and not (tmp_path / "v" / "last.pt").exists()


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_early_stopping_keeps_the_best_epoch_by_the_objective_trained_for(tmp_path, objective):
    # Sixteen training images and a large lr: the model overfits, the validation score turns
    # up, and training stops `patience` epochs after its best epoch, whose weights it keeps.
    # The score is the objective's: the -ELBO, or the -IWAE bound with k=5 (fixed noise).
    k = 5 if objective == "iwae" else 1
    trainer = _trainer(
        WIDE, epochs=200, lr=3e-3, batch_size=16, patience=3, objective=objective, iwae_k=k
    )
    val = _images(64, 1)
    result = trainer.fit(_images(16, 0), val, tmp_path)
    score, best = [m[f"val_neg_{objective}"] for m in result.history], result.best_val_score
    assert result.stopped_early and result.epochs_completed < 200
    assert result.best_epoch == result.epochs_completed - 3
    assert min(score) == score[result.best_epoch - 1] == best
    assert all(v > best for v in score[result.best_epoch :])  # it did worsen
    assert result.best_val_neg_elbo == result.history[result.best_epoch - 1]["val_neg_elbo"]
    assert load_checkpoint(tmp_path / "last.pt")["best_val_score"] == best
    # The weights kept are the best epoch's: scored again on the same fixed validation bits
    # and noise, they give the figure that epoch had.
    fixed = trainer._fixed_validation_set(val)
    if objective == "elbo":
        again = dataset_elbo(trainer.model, fixed, EVAL_BATCH_SIZE, trainer._eval_generator()).elbo
        assert best == result.best_val_neg_elbo
    else:
        again = iwae_log_likelihood(trainer.model, fixed, 5, seed=trainer._eval_seed)
        assert best == result.best_val_neg_iwae
    assert float(-again.mean()) == pytest.approx(best, rel=1e-6)


@pytest.mark.parametrize("model_config", [SMALL, TWO_LAYER], ids=["one-layer", "two-layer"])
def test_the_iwae_objective_trains_and_its_bound_beats_the_elbo(tmp_path, model_config):
    trainer = _trainer(model_config, objective="iwae", iwae_k=5)
    result = trainer.fit(_images(256, 0), _images(64, 1), tmp_path)
    assert result.history[-1]["val_neg_elbo"] < result.history[0]["val_neg_elbo"]
    # The k=5 bound on the training data is tighter than the one-sample ELBO on the same data.
    x = torch.bernoulli(to_unit_float(_images(256, 0)), generator=torch.Generator().manual_seed(0))
    model = trainer.model
    with torch.no_grad():
        eps = torch.randn(256, 5, model.noise_dim, generator=torch.Generator().manual_seed(1))
        assert iwae_bound(model, x, eps).mean() > model.elbo_terms(x, eps[:, 0]).elbo.mean()


def test_float_view_and_dynamic_binarization():
    """The views a model sees come from the trainer: uint8 -> float in [0, 1], and a fresh
    seeded Bernoulli draw of every image each epoch (the binarized variant), from the pixels'
    grey levels."""
    images = torch.tensor([[[0, 255], [128, 64]]], dtype=torch.uint8).repeat(4, 14, 14)
    x = to_unit_float(images)
    assert x.shape == (4, 1, 28, 28) and x.dtype == torch.float32
    assert x.min() == 0.0 and x.max() == 1.0
    assert to_unit_float(images.unsqueeze(1)).shape == (4, 1, 28, 28)

    def epoch_inputs() -> list[torch.Tensor]:
        """What the loss sees in each of two epochs, training on a single image."""
        seen: list[torch.Tensor] = []
        trainer = _trainer(TINY, epochs=2, batch_size=8, data_variant="binarized")
        loss_fn = trainer.loss_fn
        trainer.loss_fn = lambda model, xb, eps, beta, objective: (
            seen.append(xb) or loss_fn(model, xb, eps, beta, objective)
        )
        trainer.fit(images[:1], images[:1])
        return seen

    b1, b2 = epoch_inputs()
    assert b1.dtype == torch.float32 and set(b1.unique().tolist()) <= {0.0, 1.0}
    x1 = x[:1]
    assert torch.all(b1[x1 == 0] == 0) and torch.all(b1[x1 == 1] == 1)
    grey = torch.cat([b1[x1 == 128 / 255], b2[x1 == 128 / 255]])  # 392 Bernoulli(0.502) draws
    assert 0.4 < grey.mean().item() < 0.6
    assert not torch.equal(b1, b2)  # fresh draws each epoch: dynamic binarization
    again = epoch_inputs()
    assert torch.equal(again[0], b1) and torch.equal(again[1], b2)  # seeded


def test_the_kl_warm_up_weights_the_kl_from_0_to_beta_and_the_elbo_stays_unweighted(tmp_path):
    """train.warmup_epochs: the KL weight of epoch e is beta * min(1, e / warmup_epochs), the
    trained objective -(recon - weight KL) differs from the -ELBO by (1 - weight) KL, and the
    validation figures stay the unweighted -ELBO."""
    trainer = _trainer(TINY, epochs=6, batch_size=16, beta=0.8, warmup_epochs=4)
    with torch.no_grad():  # posterior means of 2: a KL of about 4 nats, visible in the loss
        trainer.model.encoder.head.bias[: TINY.latent_dim] = 2.0
    steps, loss_fn = [], trainer.loss_fn

    def recording_loss(model, x, eps, beta, objective):
        with torch.no_grad():  # the KL this step's loss weighs, from the same noise
            steps.append((beta, len(x), model.elbo_terms(x, eps).kl.double().sum().item()))
        return loss_fn(model, x, eps, beta, objective)

    trainer.loss_fn = recording_loss
    history = trainer.fit(_images(64, 0), _images(16, 1), tmp_path).history
    weights = [m["beta"] for m in history]
    assert weights == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 0.8])  # then beta, not 1
    assert [w for w, _, _ in steps] == [w for w in weights for _ in range(4)]  # 4 steps each
    for epoch, m in enumerate(history):
        epoch_steps = steps[4 * epoch : 4 * epoch + 4]
        kl = sum(k for _, _, k in epoch_steps) / sum(n for _, n, _ in epoch_steps)
        assert kl > 1.0
        gap = m["train_neg_elbo"] - m["train_loss"]
        assert gap == pytest.approx((1 - weights[epoch]) * kl, rel=1e-4, abs=1e-3), epoch
        assert m["val_neg_elbo"] == pytest.approx(m["val_recon"] + m["val_kl"], rel=1e-6)


def test_the_seed_alone_fixes_the_initial_weights(tmp_path):
    """Whatever ran before (torch's global generator in any state), the same seed gives the
    same model: build_vae(seed=...) and run_training both."""
    torch.manual_seed(1)
    a = build_vae(SMALL, seed=7).state_dict()
    torch.manual_seed(2)
    torch.rand(1000)
    b = build_vae(SMALL, seed=7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_vae(SMALL, seed=8).state_dict()
    assert not all(torch.equal(a[k], c[k]) for k in a)
    splits = SimpleNamespace(train_images=_images(64, 0), val_images=_images(16, 1))
    outs = []
    for global_seed in (3, 4):
        torch.manual_seed(global_seed)
        out = run_training(splits, SMALL, _config(epochs=0, seed=7), tmp_path / str(global_seed))
        outs.append(out.model.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert all(torch.equal(outs[0][k], a[k]) for k in a)


def _clocked(seconds_per_epoch: float, **overrides) -> Trainer:
    """A trainer whose clock advances `seconds_per_epoch` per epoch (it reads the clock twice
    per epoch): the time budget is tested without depending on the machine's speed."""
    trainer = _trainer(lr=1e-3, lr_schedule="exponential", lr_final=0.1, **overrides)
    trainer.clock = partial(next, (seconds_per_epoch * (k // 2) for k in count(1)))
    return trainer


def test_a_time_budget_ends_the_exponential_schedule_at_its_final_rate(tmp_path):
    # 100 epochs planned, a 1-minute budget, 20 s per epoch: the budget stops the run after 3
    # epochs, and the decay follows the budget (the share spent by each epoch's end, 0, 2/3
    # and 1) instead of the 100 epochs, so the last epoch runs at lr * lr_final.
    trainer = _clocked(20.0, epochs=100, max_minutes=1.0)
    result = trainer.fit(_images(64, 0), _images(16, 1), tmp_path / "straight")
    # Stopped by the epoch that spent the budget, not by early stopping.
    assert result.stopped_by_time and not result.stopped_early and result.epochs_completed == 3
    rates = [m["lr"] for m in result.history]
    assert rates == pytest.approx([1e-3, 1e-3 * 0.1 ** (2 / 3), 1e-4])
    # Interrupted after epoch 2 and resumed: the checkpoint carries the time spent, so the
    # resumed run takes the same rates and stops at the same epoch.
    with pytest.raises(KeyboardInterrupt):
        _clocked(20.0, epochs=100, max_minutes=1.0).fit(
            _images(64, 0), _images(16, 1), tmp_path / "resumed", [_stop_after(2)]
        )
    resumed = _clocked(20.0, epochs=100, max_minutes=1.0).fit(
        _images(64, 0), _images(16, 1), tmp_path / "resumed"
    )
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_completed == 3
    assert [m["lr"] for m in resumed.history] == pytest.approx(rates)
    # A fresh start on the same trainer starts with the whole budget again.
    again = trainer.fit(_images(64, 0), _images(16, 1), tmp_path / "again")
    assert [m["lr"] for m in again.history] == pytest.approx(rates)
    # Without a budget, slow epochs change nothing: the rate follows the epochs.
    result = _clocked(1000.0, epochs=4).fit(_images(64, 0), _images(16, 1), tmp_path / "free")
    assert not result.stopped_by_time and result.epochs_completed == 4
    rates = [m["lr"] for m in result.history]
    assert rates == pytest.approx([1e-3 * 0.1 ** (e / 3) for e in range(4)])


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts what makes the host wait for the device: a tensor read as a Python value."""

    READS = {"__bool__", "__float__", "__int__", "__index__", "item", "tolist"}

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += getattr(func, "__name__", "") in self.READS
        return func(*args, **(kwargs or {}))


def test_an_epoch_waits_on_the_device_a_fixed_number_of_times_however_many_steps():
    # A per-step `if not torch.isfinite(loss)` made a GPU step wait for the one before it.
    reads = []
    for batch_size in (128, 16):  # 2 steps, then 16
        trainer = _trainer(batch_size=batch_size)
        x = to_unit_float(_images(256, 0))
        with _HostReads() as mode:
            trainer.train_epoch(x, epoch=0, beta=1.0)
        reads.append(mode.count)
    assert reads[0] == reads[1] <= 4, reads


def test_a_checkpoint_from_another_kind_of_device_resumes_with_a_reseeded_noise_stream(tmp_path):
    # A CUDA generator's state is 16 bytes, a CPU one's 5,056: set_state refused the other's.
    train, val, folder = _images(128, 0), _images(32, 1), tmp_path / "moved"
    with pytest.raises(KeyboardInterrupt):
        _trainer().fit(train, val, folder, [_stop_after(1)])
    state = load_checkpoint(folder / "last.pt")
    state["noise_rng"] = torch.zeros(16, dtype=torch.uint8)  # as a CUDA generator writes it
    torch.save(state, folder / "last.pt")
    weights = []
    for copy in ("a", "b"):
        shutil.copytree(folder, tmp_path / copy)
        trainer = _trainer()
        result = trainer.fit(train, val, tmp_path / copy)
        assert result.resumed_from_epoch == 1 and result.epochs_completed == 3
        assert result.noise_reseeded
        weights.append(trainer.model.state_dict())
    for name, tensor in weights[0].items():  # reseeded from the epoch: reproducible
        assert torch.equal(tensor, weights[1][name]), name
    assert not _trainer().fit(train, val, tmp_path / "fresh").noise_reseeded


def test_checkpoint_every_s_writes_less_often_and_the_last_epoch_always(tmp_path):
    train, val = _images(128, 0), _images(32, 1)
    clock = count(step=10.0)  # every reading 10 s later: an epoch "takes" 10 s
    sparse = _trainer(epochs=4, checkpoint_every_s=25.0)
    sparse.clock = partial(next, clock)
    written = []
    sparse.fit(train, val, tmp_path / "sparse", [lambda m: written.append(_saved(tmp_path))])
    # Epochs end at 10, 20, 30 and 40 s of training: a checkpoint after the third (30 - 0 >=
    # 25), none after the fourth (40 - 30 < 25) until training ends, then the fourth.
    assert written == [None, None, 3, 3]
    assert _saved(tmp_path) == 4
    dense = _trainer(epochs=4)
    dense.fit(train, val, tmp_path / "dense")
    for name in ("last.pt", "best.pt"):  # the same files as after every epoch
        a, b = (torch.load(tmp_path / d / name, weights_only=True) for d in ("sparse", "dense"))
        a, b = (s["model"] if name == "last.pt" else s for s in (a, b))
        for key, tensor in a.items():
            assert torch.equal(tensor, b[key]), (name, key)


def _saved(tmp_path) -> int | None:
    path = tmp_path / "sparse" / "last.pt"
    return load_checkpoint(path)["epoch"] if path.is_file() else None


def test_auto_precision_is_bf16_only_where_matrix_units_make_it_pay_and_says_why(monkeypatch):
    from vae_core.training import precision

    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: False)  # an AMD box, say
    chosen = _trainer(batch_size=1024).precision
    assert chosen.name == "fp32" and "without bf16 matrix units (no AMX)" in chosen.reason
    x = _images(64, 0)
    result = _trainer(batch_size=1024, epochs=1).fit(x, x[:16])
    assert (result.precision, result.precision_reason) == (chosen.name, chosen.reason)

    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: True)
    assert _trainer(batch_size=1024).precision.name == "bf16"
    small = _trainer(batch_size=128).precision  # per-step overhead, not arithmetic, binds
    assert small.name == "fp32" and "batch 128 < 512" in small.reason
    assert _trainer(batch_size=128, matmul_precision="bf16").precision.name == "bf16"  # as set
    expected = "train.matmul_precision: expected one of fp32, bf16, auto"
    with pytest.raises(ValueError, match=expected):
        precision.resolve_precision("fp16", torch.device("cpu"), field="train.matmul_precision")


def test_bf16_training_keeps_the_reductions_in_float32_and_learns():
    trainer = _trainer(matmul_precision="bf16", epochs=2)
    x = to_unit_float(_images(256, 0))
    seen = []
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda *a: seen.append(loss_fn(*a)) or seen[-1]
    trainer.train_epoch(x, epoch=0, beta=1.0)
    loss, bound = seen[0]
    assert loss.dtype == torch.float32 and bound.dtype == torch.float32
    result = _trainer(matmul_precision="bf16", epochs=3).fit(_images(256, 0), _images(64, 1))
    history = [h["val_neg_elbo"] for h in result.history]
    assert result.precision == "bf16" and history[-1] < history[0], history


@pytest.mark.parametrize("amx", [True, False])
def test_the_budget_recipe_trains_with_this_hardwares_batch_precision_and_scaled_lr(
    monkeypatch, amx
):
    from vae_core.config import ConfigError
    from vae_core.training import precision
    from vae_core.training.recipe import BUDGET_RECIPES, apply_recipe

    monkeypatch.setattr(precision, "cpu_has_amx_bf16", lambda: amx)
    with pytest.raises(ConfigError, match=r"train.recipe: .* train.max_minutes > 0, found 0"):
        _trainer(recipe="budget")
    recipe = BUDGET_RECIPES["cpu-bf16" if amx else "cpu"]
    trainer = _trainer(recipe="budget", max_minutes=5.0, lr=1e-3, batch_size=32, epochs=1)
    assert trainer.config.batch_size == recipe.batch_size != 32
    assert trainer.config.lr == pytest.approx(1e-3 * (recipe.batch_size / 128) ** 0.5)
    assert trainer.precision.name == recipe.matmul_precision == ("bf16" if amx else "fp32")
    assert trainer.recipe.startswith(f"budget ({'cpu-bf16' if amx else 'cpu'}): batch")
    assert apply_recipe(trainer.config, trainer.device)[0] == trainer.config  # applied once
    long_run = _config(recipe="budget", max_minutes=5.0, lr_schedule="burda")
    assert apply_recipe(long_run, trainer.device)[0].lr_schedule == "burda"  # kept, not replaced
    x = _images(64, 0)
    result = trainer.fit(x, x[:16])
    assert (result.batch_size, result.lr, result.recipe) == (
        recipe.batch_size,
        trainer.config.lr,
        trainer.recipe,
    )
    fixed = _trainer(batch_size=32)
    assert fixed.config.batch_size == 32 and fixed.recipe.startswith("fixed")
