"""Time the IWAE evaluation of the default MLP VAE (784-400-20), one `name value` per line.

    .venv/bin/python scripts/bench_eval.py                       # embedded test set, CPU or GPU
    .venv/bin/python scripts/bench_eval.py --mnist-dir ../shared/data/mnist --train-epochs 10

Runs k=100 and k=1000 on 1,000 test images (the first 1,000 of a seeded permutation), and
k=5000 on the whole test set only when CUDA is present. With --train-epochs N the model is first
trained (dynamically binarized, the library's trainer) so the printed NLLs mean something;
without it the weights are random and only the timings are meaningful. The IWAE cost does not
depend on the weights.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vae_core.evaluation.likelihood import elbo_summary, iwae_nll  # noqa: E402
from vae_core.models.vae import VAE, VAEConfig  # noqa: E402
from vae_core.training import TrainConfig, Trainer, load_model, pick_device  # noqa: E402
from vae_core.training.run import split_inputs  # noqa: E402


def _splits(mnist_dir: Path | None):
    from vae_core.data import load_raw, load_splits, make_splits

    if mnist_dir is None:
        return "embedded", load_splits("embedded", "mnist", val_size=500)
    splits, _ = make_splits(*load_raw(mnist_dir), val_size=5000, split_seed=0, binarize_seed=0)
    return "full_mnist", splits


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_iwae(model, x, k: int, test_size: int, seed: int, device: torch.device, label: str):
    _sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    result = iwae_nll(model, x, k, test_size=test_size, seed=seed)
    _sync(device)
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    n = len(result.indices)
    print(f"{label}_k {k}")
    print(f"{label}_test_size {n}")
    print(f"{label}_seconds {seconds:.3f}")
    # Process CPU time over all threads: on a shared machine wall time also counts waiting.
    print(f"{label}_cpu_seconds {cpu_seconds:.3f}")
    print(f"{label}_images_per_second {n / seconds:.1f}")
    print(f"{label}_decoder_passes_per_second {n * k / seconds:.0f}")
    print(f"{label}_nll_iwae {result.mean:.3f}")
    print(f"{label}_nll_iwae_stderr {result.stderr:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mnist-dir",
        type=Path,
        default=None,
        help="folder of the four IDX files (default: the embedded subset)",
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="a saved model to time")
    parser.add_argument("--train-epochs", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    data_name, splits = _splits(args.mnist_dir)
    print(f"device {device}")
    print(f"device_name {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}")
    print(f"torch_threads {torch.get_num_threads()}")
    print(f"data {data_name}")
    print("model mlp_784_400_20_bernoulli")
    print("data_variant binarized")
    if args.model_dir is not None:
        model = load_model(args.model_dir, device)
        print(f"weights {args.model_dir}")
    else:
        torch.manual_seed(args.seed)
        model = VAE(VAEConfig())
        if args.train_epochs > 0:
            t0 = time.perf_counter()
            trainer = Trainer(
                model,
                TrainConfig(
                    epochs=args.train_epochs, patience=0, device=str(device), seed=args.seed
                ),
                progress=False,
            )
            trainer.fit(splits.train_images, splits.val_images)
            model = trainer.model
            print(f"train_epochs {args.train_epochs}")
            print(f"train_seconds {time.perf_counter() - t0:.1f}")
        print(f"weights {'trained' if args.train_epochs > 0 else 'random_init'}")
    model = model.to(device).eval()
    x = split_inputs(splits, "test", "binarized").to(device)

    elbo = elbo_summary(model, x, seed=args.seed)
    print(f"test_size_full {len(x)}")
    print(f"test_neg_elbo {elbo.neg_elbo:.3f}")
    print(f"test_recon {elbo.recon:.3f}")
    print(f"test_kl {elbo.kl:.3f}")
    iwae_nll(model, x[:8], 10)  # warm-up: allocator, kernels
    _time_iwae(model, x, 100, 1000, args.seed, device, "iwae_k100_n1000")
    _time_iwae(model, x, 1000, 1000, args.seed, device, "iwae_k1000_n1000")
    if device.type == "cuda":
        _time_iwae(model, x, 5000, 0, args.seed, device, "iwae_k5000_full")
    return 0


if __name__ == "__main__":
    sys.exit(main())
