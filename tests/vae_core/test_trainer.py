"""The trainer: learning, exact resume, refusing a non-finite loss, callbacks."""

import pytest
import torch

from vae_core.models import VAEConfig, build_vae
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


def test_early_stopping_on_a_flat_validation_loss(tmp_path):
    # lr tiny: the validation loss barely moves, so patience=1 stops after two epochs at most
    # of no improvement; with a vanishing lr the loss can still creep down, so allow that.
    trainer = Trainer(build_vae(SMALL), _config(epochs=20, lr=1e-9, patience=1), progress=False)
    result = trainer.fit(_images(64, 0), _images(32, 1), tmp_path)
    assert result.stopped_early and result.epochs_completed < 20


def test_binarized_variant_feeds_binary_pixels(tmp_path):
    batches = []
    trainer = Trainer(build_vae(SMALL), _config(epochs=1, data_variant="binarized"), progress=False)
    original = trainer.loss_fn
    trainer.loss_fn = lambda model, x, beta, gen: batches.append(x) or original(model, x, beta, gen)
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
        CheckpointMismatchError, match=r"last.pt: .*train.lr: checkpoint 0.001, now 0.003"
    ):
        other_lr.fit(_images(128, 0), _images(32, 1), tmp_path)
    # More epochs (and a new patience) is what resuming is for: allowed.
    more = Trainer(build_vae(SMALL, seed=0), _config(epochs=2, patience=3), progress=False)
    result = more.fit(_images(128, 0), _images(32, 1), tmp_path)
    assert result.resumed_from_epoch == 1 and result.epochs_completed == 2
