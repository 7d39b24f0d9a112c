"""`python3 -m experiments bench` (and `vae-pipeline bench`): the project's trainer against the
design document's loop, in one run.

The reference is written the design document's way (torchvision dataset, DataLoader, batch 64,
per-batch loss.item(), on the CPU), as in ../shared/baselines/seed_vae.py. Both train the same
MLP 784-400-20 on continuous [0, 1] pixels with a summed BCE, so their test -ELBO figures (one
sample, nats per image, *not* a likelihood) compare like with like. Prints `name value` lines
as they are measured.

Every samples-per-second figure leaves out the first epoch of its run (the warm-up: thread
pools, the allocator, CUDA kernels and compilation), unless only one epoch ran. Each is also
given as a fraction of two peak rates measured in the same run on --device, a large fp32 and a
large bf16 matrix product: `*_fraction_of_fp32_matmul` and `*_fraction_of_bf16_matmul` (the
trainer's precision is train.matmul_precision resolved at its batch, `project_train_precision`;
the reference runs in fp32 on the CPU whatever the device, so its fractions say how far it
stays from what the device could do).

Time to target: the project is given the wall time the reference took and trains under its
budget recipe (vae_core.training.recipe, `project_recipe_to_target`) until its test -ELBO
reaches the reference's; `time_to_target_speedup` is the reference's time over that.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vae_core.config import TrainConfig, VAEConfig
from vae_core.flops import matmul_gflops, training_flops_per_image
from vae_core.models.factory import build_vae
from vae_core.objectives import dataset_elbo, training_loss
from vae_core.training.precision import resolve_precision
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


def _torchvision_root(mnist_dir: Path, root: Path) -> None:
    """The four IDX files, uncompressed, where torchvision's MNIST class reads them (it then
    checks no md5 sums, so a synthetic folder of the same format works too)."""
    from vae_core.data import locate_raw_files

    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for path in locate_raw_files(mnist_dir).values():
        if path.name.endswith(".gz"):
            with gzip.open(path) as src, open(raw / path.name.removesuffix(".gz"), "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            os.symlink(path.resolve(), raw / path.name)


def samples_per_second_after_warmup(samples_per_epoch: int, epoch_seconds: list[float]) -> float:
    """Samples per second over the epochs after the first (the warm-up), or over the one epoch
    when only one ran."""
    timed = epoch_seconds[1:] or epoch_seconds
    return samples_per_epoch * len(timed) / sum(timed)


def reference_run(mnist_dir: Path, epochs: int, batch_size: int = 64, seed: int = 0) -> dict:
    """The design document's loop: returns its samples/s (after the first epoch), train seconds
    (all epochs) and test -ELBO."""
    from torchvision import datasets, transforms

    torch.manual_seed(seed)
    root = Path(tempfile.mkdtemp(prefix="bench-mnist-"))
    try:
        _torchvision_root(mnist_dir, root)
        train = datasets.MNIST(root, train=True, transform=transforms.ToTensor())
        test = datasets.MNIST(root, train=False, transform=transforms.ToTensor())
        loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True)
        enc, dec = _RefEncoder(), _RefDecoder()
        opt = torch.optim.Adam([*enc.parameters(), *dec.parameters()], lr=1e-3)
        epoch_seconds = []
        for _ in range(epochs):
            t0 = time.perf_counter()
            for data, _ in loader:
                data = data.view(-1, 784)
                opt.zero_grad()
                mu, logvar = enc(data)
                z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
                loss = _ref_loss(data, dec(z), mu, logvar)
                loss.backward()
                opt.step()
                loss.item()
            epoch_seconds.append(time.perf_counter() - t0)
        with torch.no_grad():
            x = test.data.view(-1, 784).float() / 255.0
            mu, logvar = enc(x)
            z = mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
            test_neg_elbo = _ref_loss(x, dec(z), mu, logvar).item() / len(x)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "samples_per_second": samples_per_second_after_warmup(len(train), epoch_seconds),
        "seconds": sum(epoch_seconds),
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
    """Training samples per second of the project's trainer at a given batch size, over the
    epochs after the first (the warm-up)."""
    trainer = Trainer(
        build_vae(VAEConfig()),
        dataclasses.replace(_continuous_config(batch_size, device, False), epochs=epochs),
        progress=False,
    )
    result = trainer.fit(splits.train_images, splits.val_images[:1000])
    seconds = [record["epoch_seconds"] for record in result.history]
    return samples_per_second_after_warmup(len(splits.train_images), seconds)


def project_time_to_target(
    splits, target: float, budget_s: float, max_epochs: int, device: str, compile_: bool
) -> dict:
    """Train one epoch at a time until test -ELBO <= target, as a user with the time the
    reference took would: the budget recipe (train.recipe: budget, train.max_minutes =
    `budget_s`; its batch, precision and learning rate chosen on the validation split, see
    vae_core.training.recipe), the learning rate decaying to the end of that time.

    The clock includes the per-epoch test evaluation, so the figure is honest wall time.
    """
    config = dataclasses.replace(
        _continuous_config(TrainConfig().batch_size, device, compile_),
        recipe="budget",
        max_minutes=budget_s / 60.0,
        epochs=max_epochs,
    )
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
        trainer.count_epoch_time(epoch_seconds[-1])  # the budget's schedule follows it
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
        "recipe": trainer.recipe,
        "precision": trainer.precision.name,
    }


def run_bench(
    mnist_dir: Path,
    reference_epochs: int = 10,
    batch_size: int = 128,
    max_epochs: int = 30,
    device: str = "auto",
    compile_: bool = False,
    *,
    throughput_epochs: int = 3,
    matmul_size: int = 4096,
    emit: Callable[[str, object], None] | None = None,
) -> dict:
    """Run both sides and return the figures, each passed to ``emit(name, value)`` as soon as
    it is measured (the command line prints them, so a run stopped short keeps them)."""
    from vae_core.data import load_splits
    from vae_core.training import pick_device

    figures: dict[str, object] = {}

    def put(name: str, value: object) -> None:
        figures[name] = value
        if emit is not None:
            emit(name, value)

    splits = load_splits(str(mnist_dir), "mnist", val_size=1000)
    resolved = pick_device(device)
    put("device", str(resolved))
    put("torch_threads", torch.get_num_threads())
    precision = resolve_precision(TrainConfig().matmul_precision, resolved, batch_size)
    put("project_train_precision", precision.name)  # at --batch-size, train.matmul_precision
    peaks = {
        name: matmul_gflops(matmul_size, device=resolved, dtype=dtype)
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
    }
    for dtype, gflops in peaks.items():
        put(f"matmul_{dtype}_gflops", gflops)
    flops = training_flops_per_image(
        build_vae(VAEConfig()).to(resolved),
        lambda m, x: training_loss(m, x, torch.randn(len(x), m.noise_dim, device=x.device))[0],
    )
    put("train_mflop_per_image", flops / 1e6)

    def put_fractions(name: str, samples_per_second: float) -> None:
        """Achieved training FLOP/s over each peak rate measured in this run."""
        for dtype, gflops in peaks.items():
            put(f"{name}_fraction_of_{dtype}_matmul", samples_per_second * flops / (gflops * 1e9))

    ref = reference_run(Path(mnist_dir), reference_epochs)
    put("baseline_epochs", reference_epochs)
    put("baseline_train_seconds", ref["seconds"])
    put("baseline_test_neg_elbo_continuous_bce", ref["test_neg_elbo"])
    put("baseline_samples_per_second", ref["samples_per_second"])
    put_fractions("baseline", ref["samples_per_second"])
    ours_64 = project_throughput(splits, 64, throughput_epochs, device)
    put("project_samples_per_second", ours_64)
    put("samples_per_second_speedup", ours_64 / ref["samples_per_second"])
    ours_default = project_throughput(splits, batch_size, throughput_epochs, device)
    put(f"project_samples_per_second_batch{batch_size}", ours_default)
    put_fractions("project", ours_default)
    put("project_batch_size", batch_size)
    ttt = project_time_to_target(
        splits, ref["test_neg_elbo"], ref["seconds"], max_epochs, device, compile_
    )
    put("project_recipe_to_target", ttt["recipe"])
    put("project_precision_to_target", ttt["precision"])
    put("project_epochs_to_target", ttt["epochs"])
    put("project_seconds_to_target", ttt["seconds"])
    put("project_test_neg_elbo_continuous_bce", ttt["test_neg_elbo"])
    put("project_reached_target", ttt["reached"])
    put("time_to_target_speedup", ref["seconds"] / ttt["seconds"])
    for dtype, gflops in peaks.items():
        rates = [len(splits.train_images) / s for s in ttt["epoch_seconds"]]
        fractions = (f"{r * flops / (gflops * 1e9):.3f}" for r in rates)
        put(f"project_epoch_fractions_of_{dtype}_matmul", ",".join(fractions))
    return figures
