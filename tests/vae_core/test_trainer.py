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
    reference = Trainer(build_vae(SMALL), _config(), progress=False)
    reference.fit(_images(256, 0), _images(64, 1), tmp_path / "straight")

    def crash_after_first_epoch(metrics):
        if metrics["epoch"] == 1:
            raise KeyboardInterrupt

    interrupted = Trainer(build_vae(SMALL), _config(), progress=False)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(
            _images(256, 0),
            _images(64, 1),
            tmp_path / "resumed",
            callbacks=[crash_after_first_epoch],
        )
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["epoch"] == 1

    resumed = Trainer(build_vae(SMALL), _config(), progress=False)
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
