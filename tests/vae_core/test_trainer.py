"""The trainer: learning, exact resume, refusing a non-finite loss, callbacks."""

import pytest
import torch

from vae_core.models import VAEConfig, build_vae
from vae_core.objectives import iwae_bound
from vae_core.training import NonFiniteLossError, TrainConfig, Trainer, load_checkpoint

SMALL = VAEConfig(hidden_sizes=[64], latent_dim=4)


def _images(n: int, seed: int) -> torch.Tensor:
    """Blocky synthetic digits: structure a VAE can learn in one or two epochs."""
    gen = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, 1, 7, 7, generator=gen) > 0.6).float()
    return (torch.nn.functional.interpolate(coarse, scale_factor=4) * 255).to(torch.uint8)[:, 0]


def _config(**overrides) -> TrainConfig:
    values = dict(epochs=3, batch_size=32, seed=0, device="cpu", patience=0)
    return TrainConfig(**(values | overrides))


def test_training_lowers_validation_loss_and_reports_each_epoch(tmp_path):
    seen = []
    trainer = Trainer(build_vae(SMALL), _config(), progress=False)
    result = trainer.fit(_images(512, 0), _images(128, 1), tmp_path, callbacks=[seen.append])
    assert [m["epoch"] for m in seen] == [1, 2, 3]
    assert seen[-1]["val_neg_elbo"] < seen[0]["val_neg_elbo"]
    assert result.epochs_completed == 3 and result.train_samples_per_second > 0
    assert (tmp_path / "last.pt").is_file() and (tmp_path / "best.pt").is_file()


def test_resume_after_interruption_gives_identical_weights(tmp_path):
    reference = Trainer(build_vae(SMALL, seed=0), _config(), progress=False)
    reference.fit(_images(256, 0), _images(64, 1), tmp_path / "straight")

    def crash_after_first_epoch(metrics):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    interrupted = Trainer(build_vae(SMALL, seed=0), _config(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(
            _images(256, 0),
            _images(64, 1),
            tmp_path / "resumed",
            callbacks=[crash_after_first_epoch],
        )
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1

    resumed = Trainer(build_vae(SMALL, seed=0), _config(), progress=False)
    result = resumed.fit(_images(256, 0), _images(64, 1), tmp_path / "resumed")
    assert result.resumed_from_epoch == 1 and result.epochs_completed == 3
    for name, tensor in reference.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_non_finite_loss_stops_before_the_step(tmp_path):
    model = build_vae(SMALL)
    with torch.no_grad():
        model.decoder.net[-1].bias.fill_(float("nan"))
    trainer = Trainer(model, _config(), progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match="epoch 1, step 1"):
        trainer.fit(_images(64, 0), _images(16, 1), tmp_path)
    assert not trainer.optimizer.state  # no Adam step was taken
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]) or torch.isnan(tensor).all(), name
    assert not (tmp_path / "last.pt").exists()


def test_early_stopping_stops_when_validation_worsens_and_keeps_the_best_epoch(tmp_path):
    # Sixteen training images and a large lr: the model overfits, the validation -ELBO turns
    # up, and training stops `patience` epochs after its best epoch, whose weights it keeps.
    cfg = _config(epochs=200, lr=3e-3, batch_size=16, patience=3)
    trainer = Trainer(
        build_vae(VAEConfig(hidden_sizes=[256], latent_dim=8), seed=0), cfg, progress=False
    )
    result = trainer.fit(_images(16, 0), _images(64, 1), tmp_path)
    val = [m["val_neg_elbo"] for m in result.history]
    assert result.stopped_early and result.epochs_completed < 200
    assert result.best_epoch == result.epochs_completed - 3
    assert min(val) == val[result.best_epoch - 1] == result.best_val_neg_elbo
    assert all(v > result.best_val_neg_elbo for v in val[result.best_epoch :])  # it did worsen


def test_an_iwae_model_is_stopped_and_kept_by_its_validation_iwae_bound(tmp_path):
    # The overfitting set-up above, trained for the IWAE bound with k=5: early stopping and the
    # kept weights follow the -IWAE bound (with fixed noise), not the -ELBO.
    from vae_core.evaluation.likelihood import iwae_log_likelihood

    cfg = _config(epochs=200, lr=3e-3, batch_size=16, patience=3, objective="iwae", iwae_k=5)
    trainer = Trainer(
        build_vae(VAEConfig(hidden_sizes=[256], latent_dim=8), seed=0), cfg, progress=False
    )
    val_images = _images(64, 1)
    result = trainer.fit(_images(16, 0), val_images, tmp_path)
    bound = [m["val_neg_iwae"] for m in result.history]
    assert result.stopped_early and result.best_epoch == result.epochs_completed - 3
    assert min(bound) == bound[result.best_epoch - 1] == result.best_val_neg_iwae
    assert all(v > result.best_val_neg_iwae for v in bound[result.best_epoch :])
    assert result.best_val_score == result.best_val_neg_iwae
    assert result.best_val_neg_elbo == result.history[result.best_epoch - 1]["val_neg_elbo"]
    again = iwae_log_likelihood(
        trainer.model, trainer._fixed_validation_set(val_images), 5, seed=trainer._eval_seed
    )
    assert float(-again.mean()) == pytest.approx(result.best_val_neg_iwae, rel=1e-6)
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["best_val_score"] == result.best_val_neg_iwae


def test_the_elbo_objective_is_chosen_by_the_elbo_alone(tmp_path):
    result = Trainer(build_vae(SMALL, seed=0), _config(epochs=2), progress=False).fit(
        _images(128, 0), _images(32, 1), tmp_path
    )
    assert all("val_neg_iwae" not in m for m in result.history)
    assert result.best_val_neg_iwae is None
    assert result.best_val_score == result.best_val_neg_elbo


def test_a_non_finite_validation_loss_stops_training_before_saving_that_epoch(tmp_path):
    val = _images(16, 1).float() / 255.0
    val[0, 0, 0] = float("nan")  # no finite -ELBO can come out of this validation set
    trainer = Trainer(build_vae(SMALL, seed=0), _config(data_variant="continuous"), progress=False)
    with pytest.raises(NonFiniteLossError, match="validation -ELBO became nan after epoch 1"):
        trainer.fit(_images(64, 0), val, tmp_path)
    assert not (tmp_path / "best.pt").exists() and not (tmp_path / "last.pt").exists()


def test_the_learning_rate_follows_the_schedule(tmp_path):
    cfg = _config(epochs=4, lr=1e-3, lr_schedule="exponential", lr_final=0.1)
    trainer = Trainer(build_vae(SMALL, seed=0), cfg, progress=False)
    result = trainer.fit(_images(64, 0), _images(16, 1), tmp_path)
    assert [m["lr"] for m in result.history] == pytest.approx(
        [1e-3 * 0.1 ** (e / 3) for e in range(4)]
    )


def test_a_time_budget_stops_after_the_epoch_that_passes_it(tmp_path):
    cfg = _config(epochs=5, max_minutes=1e-9)  # any epoch takes longer than this
    result = Trainer(build_vae(SMALL, seed=0), cfg, progress=False).fit(
        _images(64, 0), _images(16, 1), tmp_path
    )
    assert result.stopped_by_time and not result.stopped_early and result.epochs_completed == 1


@pytest.mark.parametrize(
    "model_config",
    [
        SMALL,
        VAEConfig(
            architecture="mlp2",
            hidden_sizes=[64],
            latent_dim=8,
            activation="tanh",
            top_hidden_sizes=[32],
            top_latent_dim=4,
        ),
    ],
    ids=["one-layer", "two-layer"],
)
def test_the_iwae_objective_trains_and_its_bound_beats_the_elbo(tmp_path, model_config):
    cfg = _config(epochs=3, objective="iwae", iwae_k=5)
    trainer = Trainer(build_vae(model_config, seed=0), cfg, progress=False)
    result = trainer.fit(_images(256, 0), _images(64, 1), tmp_path)
    assert result.history[-1]["val_neg_elbo"] < result.history[0]["val_neg_elbo"]
    # The k=5 bound on the training data is tighter than the one-sample ELBO on the same data.
    x = torch.bernoulli(
        _images(256, 0).float().div(255).unsqueeze(1), generator=torch.Generator().manual_seed(0)
    )
    model = trainer.model
    with torch.no_grad():
        eps = torch.randn(256, 5, model.noise_dim, generator=torch.Generator().manual_seed(1))
        iwae = iwae_bound(model, x, eps).mean()
        elbo = model.elbo_terms(x, eps[:, 0]).elbo.mean()
    assert iwae > elbo


def test_binarized_variant_feeds_binary_pixels(tmp_path):
    batches = []
    trainer = Trainer(build_vae(SMALL), _config(epochs=1, data_variant="binarized"), progress=False)
    original = trainer.loss_fn
    trainer.loss_fn = lambda model, x, eps, beta, objective: (
        batches.append(x) or original(model, x, eps, beta, objective)
    )
    grey = torch.full((64, 28, 28), 128, dtype=torch.uint8)
    trainer.fit(grey, grey[:8], tmp_path)
    pixels = torch.cat(batches)
    assert set(pixels.unique().tolist()) == {0.0, 1.0}
    assert 0.4 < pixels.mean().item() < 0.6  # Bernoulli(128/255) draws


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

    from types import SimpleNamespace

    from vae_core.training import run_training

    splits = SimpleNamespace(train_images=_images(64, 0), val_images=_images(16, 1))
    outs = []
    for global_seed in (3, 4):
        torch.manual_seed(global_seed)
        out = run_training(splits, SMALL, _config(epochs=0, seed=7), tmp_path / str(global_seed))
        outs.append(out.model.state_dict())
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert all(torch.equal(outs[0][k], a[k]) for k in a)


def test_a_fresh_start_never_brings_back_an_earlier_runs_best_weights(tmp_path):
    earlier = Trainer(build_vae(SMALL, seed=0), _config(epochs=2), progress=False)
    earlier.fit(_images(128, 0), _images(32, 1), tmp_path)
    assert (tmp_path / "best.pt").is_file()
    fresh_model = build_vae(SMALL, seed=5)
    initial = {k: v.clone() for k, v in fresh_model.state_dict().items()}
    fresh = Trainer(fresh_model, _config(epochs=0), progress=False)
    fresh.fit(_images(128, 0), _images(32, 1), tmp_path, resume=False)
    assert all(torch.equal(fresh.model.state_dict()[k], v) for k, v in initial.items())
    assert not (tmp_path / "best.pt").exists()


def test_the_best_epochs_weights_are_the_ones_kept(tmp_path):
    from vae_core.objectives import dataset_elbo
    from vae_core.training import EVAL_BATCH_SIZE

    trainer = Trainer(build_vae(SMALL, seed=0), _config(epochs=4, lr=3e-3), progress=False)
    val = _images(64, 1)
    result = trainer.fit(_images(256, 0), val, tmp_path)
    best = torch.load(tmp_path / "best.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(trainer.model.state_dict()[k].cpu(), v) for k, v in best.items())
    # Scored again on the same fixed validation bits and noise: the figure the best epoch had.
    again = dataset_elbo(
        trainer.model,
        trainer._fixed_validation_set(val),
        EVAL_BATCH_SIZE,
        trainer._eval_generator(),
    )
    assert float(-again.elbo.mean()) == pytest.approx(result.best_val_neg_elbo, rel=1e-6)
    assert result.history[result.best_epoch - 1]["val_neg_elbo"] == result.best_val_neg_elbo


def test_resume_refuses_a_checkpoint_made_with_other_settings(tmp_path):
    from vae_core.training.trainer import CheckpointMismatchError

    first = Trainer(build_vae(SMALL, seed=0), _config(epochs=1), progress=False)
    first.fit(_images(128, 0), _images(32, 1), tmp_path)
    other_lr = Trainer(build_vae(SMALL, seed=0), _config(epochs=2, lr=3e-3), progress=False)
    with pytest.raises(
        CheckpointMismatchError, match=r"last.pt: .*train.lr: checkpoint 0.002, now 0.003"
    ):
        other_lr.fit(_images(128, 0), _images(32, 1), tmp_path)
    # More epochs (and a new patience) is what resuming is for: allowed.
    more = Trainer(build_vae(SMALL, seed=0), _config(epochs=2, patience=3), progress=False)
    result = more.fit(_images(128, 0), _images(32, 1), tmp_path)
    assert result.resumed_from_epoch == 1 and result.epochs_completed == 2


class _Clock:
    """A clock that advances `step` seconds per epoch (the trainer reads it twice per epoch),
    so the time budget is tested without depending on the machine's speed."""

    def __init__(self, step: float):
        self.now, self.step, self.reads = 0.0, step, 0

    def __call__(self) -> float:
        self.reads += 1
        if self.reads % 2 == 0:
            self.now += self.step
        return self.now


def test_a_time_budget_ends_the_exponential_schedule_at_its_final_rate(tmp_path):
    # 100 epochs planned, a 1-minute budget, 20 s per epoch: the budget stops the run after 3
    # epochs, and the decay follows the budget (the share spent by each epoch's end, 0, 2/3
    # and 1) instead of the 100 epochs, so the last epoch runs at lr * lr_final.
    cfg = _config(epochs=100, lr=1e-3, lr_schedule="exponential", lr_final=0.1, max_minutes=1.0)
    trainer = Trainer(build_vae(SMALL, seed=0), cfg, progress=False)
    trainer.clock = _Clock(20.0)
    result = trainer.fit(_images(64, 0), _images(16, 1), tmp_path / "straight")
    assert result.stopped_by_time and result.epochs_completed == 3
    rates = [m["lr"] for m in result.history]
    assert rates == pytest.approx([1e-3, 1e-3 * 0.1 ** (2 / 3), 1e-4])

    # Interrupted after epoch 2 and resumed: the checkpoint carries the time spent, so the
    # resumed run takes the same rates and stops at the same epoch.
    def stop_after_second_epoch(metrics):
        if metrics["epoch"] == 2:
            raise KeyboardInterrupt

    first = Trainer(build_vae(SMALL, seed=0), cfg, progress=False)
    first.clock = _Clock(20.0)
    with pytest.raises(KeyboardInterrupt):
        first.fit(_images(64, 0), _images(16, 1), tmp_path / "resumed", [stop_after_second_epoch])
    second = Trainer(build_vae(SMALL, seed=0), cfg, progress=False)
    second.clock = _Clock(20.0)
    resumed = second.fit(_images(64, 0), _images(16, 1), tmp_path / "resumed")
    assert resumed.resumed_from_epoch == 2 and resumed.epochs_completed == 3
    assert [m["lr"] for m in resumed.history] == pytest.approx(rates)

    # A fresh start on the same trainer starts with the whole budget again.
    again = trainer.fit(_images(64, 0), _images(16, 1), tmp_path / "again")
    assert [m["lr"] for m in again.history] == pytest.approx(rates)


def test_without_a_time_budget_the_schedule_follows_the_epochs(tmp_path):
    cfg = _config(epochs=3, lr=1e-3, lr_schedule="exponential", lr_final=0.1)
    trainer = Trainer(build_vae(SMALL, seed=0), cfg, progress=False)
    trainer.clock = _Clock(1000.0)  # slow epochs change nothing without max_minutes
    result = trainer.fit(_images(64, 0), _images(16, 1), tmp_path)
    assert not result.stopped_by_time
    assert [m["lr"] for m in result.history] == pytest.approx([1e-3, 1e-3 * 0.1**0.5, 1e-4])
