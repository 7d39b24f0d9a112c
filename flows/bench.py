"""`vae-pipeline bench`: the project's trainer against the design document's loop, in one run.

The reference is written the design document's way (torchvision dataset, DataLoader, batch 64,
per-batch loss.item()), as in ../shared/baselines/seed_vae.py. Both train the same MLP
784-400-20 on continuous [0, 1] pixels with a summed BCE, so their test -ELBO figures (one
sample, nats per image, *not* a likelihood) compare like with like. Prints `name value` lines.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vae_core.config import TrainConfig, VAEConfig
from vae_core.flops import matmul_gflops, training_flops_per_image
from vae_core.models.factory import build_vae
from vae_core.objectives import dataset_elbo, training_loss
from vae_core.training.trainer import Trainer, to_unit_float


class _RefEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2_mu, self.fc2_logvar = (
            nn.Linear(784, 400),
            nn.Linear(400, 20),
            nn.Linear(400, 20),
        )

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2_mu(h), self.fc2_logvar(h)


class _RefDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 400), nn.Linear(400, 784)

    def forward(self, z):
        return torch.sigmoid(self.fc2(F.relu(self.fc1(z))))


def _ref_loss(x, x_hat, mu, logvar):
    bce = F.binary_cross_entropy(x_hat, x, reduction="sum")
    return bce - 0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())


def reference_run(mnist_dir: Path, epochs: int, batch_size: int = 64, seed: int = 0) -> dict:
    """The design document's loop: returns its samples/s, train seconds and test -ELBO."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    root = Path(tempfile.mkdtemp(prefix="bench-mnist-"))
    try:
        raw = root / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for name in os.listdir(mnist_dir):
            if name.endswith(".gz"):
                os.symlink(Path(mnist_dir, name).resolve(), raw / name)
        train = datasets.MNIST(root, train=True, transform=transforms.ToTensor(), download=True)
        test = datasets.MNIST(root, train=False, transform=transforms.ToTensor(), download=True)
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
        enc, dec = _RefEncoder(), _RefDecoder()
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
        seen, start = 0, time.perf_counter()
        for _ in range(epochs):
            for data, _ in loader:
                data = data.view(-1, 784)
                opt.zero_grad()
                mu, logvar = enc(data)
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
                loss = _ref_loss(data, dec(z), mu, logvar)
                loss.backward()
                opt.step()
                loss.item()
                seen += len(data)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            x = test.data.view(-1, 784).float() / 255.0
            mu, logvar = enc(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            test_neg_elbo = _ref_loss(x, dec(z), mu, logvar).item() / len(x)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "samples_per_second": seen / seconds,
        "seconds": seconds,
        "test_neg_elbo": test_neg_elbo,
    }


def _continuous_config(batch_size: int, device: str, compile_: bool) -> TrainConfig:
    """The project's default recipe (params.yaml's train section: its learning rate and its
    schedule over the default number of epochs) on the design document's data variant."""
    return dataclasses.replace(
        TrainConfig(),
        batch_size=batch_size,
        data_variant="continuous",
        patience=0,
        device=device,
        compile=compile_,
    )


def project_throughput(splits, batch_size: int, epochs: int, device: str) -> float:
    """Training samples per second of the project's trainer at a given batch size."""
    trainer = Trainer(
        build_vae(VAEConfig()),
        dataclasses.replace(_continuous_config(batch_size, device, False), epochs=epochs),
        progress=False,
    )
    result = trainer.fit(splits.train_images, splits.val_images[:1000])
    return result.train_samples_per_second


def project_time_to_target(
    splits, target: float, batch_size: int, max_epochs: int, device: str, compile_: bool
) -> dict:
    """Train with the project's defaults, one epoch at a time, until test -ELBO <= target.

    The clock includes the per-epoch test evaluation, so the figure is honest wall time.
    """
    config = _continuous_config(batch_size, device, compile_)
    trainer = Trainer(build_vae(VAEConfig(), seed=config.seed), config, progress=False)
    x_test = to_unit_float(splits.test_images).to(trainer.device)
    gen = torch.Generator(device=trainer.device)
    train_x = to_unit_float(splits.train_images).to(trainer.device)
    start = time.perf_counter()
    neg_elbo, epoch, epoch_seconds = float("inf"), 0, []
    for epoch in range(1, max_epochs + 1):  # noqa: B007
        t0 = time.perf_counter()
        trainer.train_epoch(train_x, epoch - 1, 1.0)
        epoch_seconds.append(time.perf_counter() - t0)
        trainer.model.eval()
        gen.manual_seed(epoch)
        neg_elbo = float(-dataset_elbo(trainer.model, x_test, 10_000, gen).elbo.mean())
        if neg_elbo <= target:
            break
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "epochs": epoch,
        "test_neg_elbo": neg_elbo,
        "reached": neg_elbo <= target,
        "epoch_seconds": epoch_seconds,
    }


def _device(device: str) -> torch.device:
    from vae_core.training import pick_device

    return pick_device(device)


def run_bench(
    mnist_dir: Path,
    reference_epochs: int = 10,
    batch_size: int = 128,
    max_epochs: int = 30,
    device: str = "auto",
    compile_: bool = False,
) -> dict:
    """Run both sides and return the figures (also printed by the CLI)."""
    from vae_core.data import load_splits

    splits = load_splits(str(mnist_dir), "mnist", val_size=1000)
    matmul = matmul_gflops(device=_device(device))
    flops = training_flops_per_image(
        build_vae(VAEConfig()).to(_device(device)),
        lambda m, x: training_loss(m, x, torch.randn(len(x), m.noise_dim, device=x.device))[0],
    )

    def floor_fraction(samples_per_second: float) -> float:
        """Achieved training FLOP/s over the matmul rate measured in this run."""
        return samples_per_second * flops / (matmul * 1e9)

    ref = reference_run(Path(mnist_dir), reference_epochs)
    ours_64 = project_throughput(splits, 64, 2, device)
    ours_default = project_throughput(splits, batch_size, 2, device)
    ttt = project_time_to_target(
        splits, ref["test_neg_elbo"], batch_size, max_epochs, device, compile_
    )
    return {
        "device": str(
            Trainer(build_vae(VAEConfig()), _continuous_config(64, device, False)).device
        ),
        "torch_threads": torch.get_num_threads(),
        "baseline_samples_per_second": ref["samples_per_second"],
        "project_samples_per_second": ours_64,
        "samples_per_second_speedup": ours_64 / ref["samples_per_second"],
        f"project_samples_per_second_batch{batch_size}": ours_default,
        "baseline_epochs": reference_epochs,
        "baseline_train_seconds": ref["seconds"],
        "baseline_test_neg_elbo_continuous_bce": ref["test_neg_elbo"],
        "project_batch_size": batch_size,
        "project_epochs_to_target": ttt["epochs"],
        "project_seconds_to_target": ttt["seconds"],
        "project_test_neg_elbo_continuous_bce": ttt["test_neg_elbo"],
        "project_reached_target": ttt["reached"],
        "time_to_target_speedup": ref["seconds"] / ttt["seconds"],
        "matmul_gflops": matmul,
        "train_mflop_per_image": flops / 1e6,
        "baseline_compute_floor_fraction": floor_fraction(ref["samples_per_second"]),
        "project_compute_floor_fraction": floor_fraction(ours_default),
        "project_epoch_compute_floor_fractions": ",".join(
            f"{floor_fraction(len(splits.train_images) / s):.3f}" for s in ttt["epoch_seconds"]
        ),
    }
