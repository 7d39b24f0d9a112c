"""A small MNIST classifier, trained in-house, whose penultimate layer defines the feature space
of every sample-quality figure (Frechet distance, KID, precision/recall, density/coverage).

Inception weights are not available here, and Inception features are meaningless on 28x28
digits anyway. This network is deterministic for a given seed, device and torch build, and its
weights are a versioned output (a DVC stage runs the CLI below), so sample-quality figures are
comparable between runs that used the same classifier.

    python -m vae_core.evaluation.classifier --processed data/processed --out data/classifier
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from vae_core.atomic import atomic_torch_save, atomic_write_text
from vae_core.training.checkpoint import read_state_dict
from vae_core.training.device import pick_device

if TYPE_CHECKING:
    from vae_core.data.splits import DatasetSplits

WEIGHTS_NAME = "classifier.pt"
CONFIG_NAME = "classifier.json"
FORMAT_VERSION = 1
# The MNIST training-set pixel mean and standard deviation: inputs are standardized with them.
PIXEL_MEAN, PIXEL_STD = 0.1307, 0.3081


@dataclass(frozen=True)
class ClassifierConfig:
    """The network's shape; saved beside the weights so load_classifier can rebuild it."""

    channels: tuple[int, int] = (32, 64)
    feature_dim: int = 128
    num_classes: int = 10

    @classmethod
    def from_dict(cls, values: dict) -> ClassifierConfig:
        return cls(
            channels=tuple(int(c) for c in values.get("channels", cls.channels)),
            feature_dim=int(values.get("feature_dim", cls.feature_dim)),
            num_classes=int(values.get("num_classes", cls.num_classes)),
        )


def as_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 grey levels or floats in [0, 1], (N, 28, 28) or (N, 1, 28, 28) -> float (N, 1, 28, 28).

    One converter for every caller, so nobody feeds 0-255 floats to the network.
    """
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    return images.float().reshape(len(images), 1, 28, 28)


class MnistClassifier(nn.Module):
    """Two stride-2 5x5 convolutions (28 -> 14 -> 7), a 128-d feature layer, a linear head.

    Strided convolutions instead of max-pooling keep a CPU epoch of full MNIST short. Inputs are
    images in [0, 1]; the standardization lives inside the module so callers cannot forget it.
    """

    def __init__(self, config: ClassifierConfig | None = None):
        super().__init__()
        self.config = config or ClassifierConfig()
        c1, c2 = self.config.channels
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(c1, c2, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, self.config.feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Linear(self.config.feature_dim, self.config.num_classes)

    @property
    def num_features(self) -> int:
        """Feature dimension (torchmetrics reads this attribute from a custom feature module)."""
        return self.config.feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (N, feature_dim): the space sample quality is measured in."""
        return self.body((as_images(x) - PIXEL_MEAN) / PIXEL_STD)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, num_classes)."""
        return self.head(self.features(x))


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def predict(
    classifier: MnistClassifier, images: torch.Tensor, batch_size: int = 2048
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, F) and class probabilities (N, C), float32 on the classifier's device."""
    device = _device_of(classifier)
    feats, probs = [], []
    was_training = classifier.training
    classifier.eval()
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            f = classifier.features(images[i : i + batch_size].to(device))
            feats.append(f.float())
            probs.append(F.softmax(classifier.head(f).float(), dim=1))
    classifier.train(was_training)
    return torch.cat(feats), torch.cat(probs)


def accuracy(
    classifier: MnistClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 2048
) -> float:
    """Fraction of images whose arg-max class equals the label."""
    _, probs = predict(classifier, images, batch_size)
    return float((probs.argmax(1).cpu() == labels.cpu()).double().mean())


def _tensor_sha256(*tensors: torch.Tensor) -> str:
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(t.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_classifier(
    splits: DatasetSplits,
    epochs: int = 3,
    batch_size: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    device: str | torch.device = "auto",
    config: ClassifierConfig | None = None,
    progress: bool = False,
) -> tuple[MnistClassifier, dict]:
    """Train on the train split (Adam, cosine learning-rate decay) and score val and test.

    The whole training set sits on the device as one tensor and batches are sliced from a
    seeded permutation, so a run is reproducible and spends its time in the network.
    """
    if epochs < 1 or batch_size < 1 or not 0 < lr <= 1:
        raise ValueError(
            "classifier: expected epochs >= 1, batch_size >= 1 and lr in (0, 1], found "
            f"epochs={epochs}, batch_size={batch_size}, lr={lr}"
        )
    dev = pick_device(str(device)) if not isinstance(device, torch.device) else device
    with deterministic_cudnn(dev.type == "cuda"):
        return _fit(splits, epochs, batch_size, lr, seed, dev, config, progress)


@contextlib.contextmanager
def deterministic_cudnn(enabled: bool) -> Iterator[None]:
    """cuDNN's deterministic kernels while the classifier trains, and the process's own
    settings back afterwards: the flags are global, and the VAE's convolutions (benchmark
    mode, say) must not inherit them."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    if enabled:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


def _fit(
    splits: DatasetSplits,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    dev: torch.device,
    config: ClassifierConfig | None,
    progress: bool,
) -> tuple[MnistClassifier, dict]:
    torch.manual_seed(seed)
    # channels_last lets oneDNN (CPU) and cuDNN pick their fastest convolution kernels.
    model = MnistClassifier(config).to(dev, memory_format=torch.channels_last)
    x = as_images(splits.train_images).to(dev)
    y = splits.train_labels.to(dev)
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    shuffle = torch.Generator().manual_seed(seed)
    history = []
    t0 = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=shuffle).to(dev)
        loss_sum = torch.zeros((), device=dev, dtype=torch.float64)
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            loss_sum += loss.detach() * len(idx)
        val_acc = accuracy(model, splits.val_images, splits.val_labels)
        history.append(
            {"epoch": epoch + 1, "train_loss": float(loss_sum) / n, "val_accuracy": val_acc}
        )
        if progress:
            print(
                f"classifier epoch {epoch + 1}/{epochs}: loss {history[-1]['train_loss']:.4f} "
                f"val acc {val_acc:.4f} ({time.perf_counter() - t0:.1f}s)",
                file=sys.stderr,
            )
    seconds = time.perf_counter() - t0
    model.eval()
    metrics = {
        "test_accuracy": accuracy(model, splits.test_images, splits.test_labels),
        "val_accuracy": history[-1]["val_accuracy"],
        "train_loss": history[-1]["train_loss"],
        "train_seconds": seconds,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "device": str(dev),
        "train_size": n,
        "test_size": len(splits.test_images),
        "train_data_sha256": _tensor_sha256(splits.train_images, splits.train_labels),
        "torch_version": torch.__version__,
        "history": history,
    }
    return model, metrics


def save_classifier(model: MnistClassifier, out_dir: Path, metrics: dict) -> Path:
    """Weights (weights-only torch file) and a JSON of config plus metrics, written atomically."""
    out_dir = Path(out_dir)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save(state, out_dir / WEIGHTS_NAME)
    config = asdict(model.config) | {"channels": list(model.config.channels)}
    # Wall-clock figures stay out of the file: it is a DVC output, and the same training must
    # give the same bytes (and md5) on every run.
    stable = {k: v for k, v in metrics.items() if not k.endswith("_seconds")}
    payload = {"format_version": FORMAT_VERSION, "config": config, "metrics": stable}
    atomic_write_text(out_dir / CONFIG_NAME, json.dumps(payload, indent=2) + "\n")
    return out_dir / WEIGHTS_NAME


def load_classifier(classifier_dir: Path, device: str | torch.device = "cpu") -> MnistClassifier:
    """Rebuild the classifier written by save_classifier, in eval mode, without unpickling code."""
    classifier_dir = Path(classifier_dir)
    for path in (classifier_dir / CONFIG_NAME, classifier_dir / WEIGHTS_NAME):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: expected a saved classifier file here, found nothing")
    payload = json.loads((classifier_dir / CONFIG_NAME).read_text())
    model = MnistClassifier(ClassifierConfig.from_dict(payload.get("config", {})))
    model.load_state_dict(read_state_dict(classifier_dir / WEIGHTS_NAME))
    return model.to(device, memory_format=torch.channels_last).eval()


#: The figures DVC shows as the classifier stage's metrics (`dvc metrics show`).
METRIC_NAMES = ("test_accuracy", "val_accuracy", "train_loss")


def write_dvc_figures(metrics: dict, metrics_path: Path | None, history_path: Path | None) -> None:
    """The stage's figures as DVC reads them, in small files outside the cached output folder:
    the final ones (a metrics file) and the per-epoch history (a plots file, x = epoch)."""
    if metrics_path is not None:
        final = {name: metrics[name] for name in METRIC_NAMES}
        atomic_write_text(metrics_path, json.dumps(final, indent=2, sort_keys=True) + "\n")
    if history_path is not None:
        atomic_write_text(history_path, json.dumps(metrics["history"], indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """CLI: train on a processed-data folder, save to --out, print the test accuracy."""
    parser = argparse.ArgumentParser(
        prog="python -m vae_core.evaluation.classifier",
        description="Train the in-house MNIST classifier used for sample-quality features.",
    )
    parser.add_argument("--processed", required=True, type=Path, help="processed-data folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--metrics", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--history", type=Path, default=None, help="and the per-epoch figures")
    args = parser.parse_args(argv)

    from vae_core.data import DataError, load_processed

    try:
        splits = load_processed(args.processed)
    except (DataError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, metrics = train_classifier(
        splits,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        device=args.device,
        progress=True,
    )
    save_classifier(model, args.out, metrics)
    write_dvc_figures(metrics, args.metrics, args.history)
    print(f"test_accuracy {metrics['test_accuracy']:.4f}")
    print(f"val_accuracy {metrics['val_accuracy']:.4f}")
    print(f"train_seconds {metrics['train_seconds']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
