"""The single evaluation entry point: every figure of a trained VAE, written into one folder.

out_dir/metrics.json            flat: numbers, plus strings that say what each figure is
out_dir/per_example_nll.npy     float64 IWAE -log p(x) per evaluated test image (likelihoods only;
                                a summed BCE on grey levels writes
                                per_example_neg_iwae_bce_greylevels.npy instead)
out_dir/per_example_index.npy   int64 positions of those images in the test set
out_dir/{samples,reconstructions,interpolation,latent_map}.png

    python -m vae_core.evaluation.report --model-dir runs/x/model --processed data/processed \
        --out runs/x/eval --classifier data/classifier
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from vae_core.atomic import atomic_write_text
from vae_core.config import DATA_VARIANTS, ConfigError, EvalConfig
from vae_core.data.errors import ProcessedDataError
from vae_core.evaluation.classifier import MnistClassifier, load_classifier
from vae_core.evaluation.images import (
    save_interpolation,
    save_model_latent_map,
    save_reconstructions,
    save_sample_grid,
)
from vae_core.evaluation.likelihood import (
    ACTIVE_UNIT_THRESHOLD,
    active_units,
    bits_per_dim,
    elbo_summary,
    iwae_nll,
    model_device,
    select_subset,
)
from vae_core.evaluation.sample_quality import sample_quality_report
from vae_core.training.checkpoint import MODEL_CONFIG_NAME, load_model
from vae_core.training.precision import resolve_precision
from vae_core.training.run import VARIANT_LABELS, split_inputs
from vae_core.training.trainer import EVAL_BATCH_SIZE

if TYPE_CHECKING:
    from vae_core.data.splits import DatasetSplits

METRICS_NAME = "metrics.json"
NLL_FILE = "per_example_nll.npy"
NOT_A_LIKELIHOOD_FILE = "per_example_neg_iwae_bce_greylevels.npy"
INDEX_FILE = "per_example_index.npy"
HOLDOUT_PREFIX = "holdout_"
PNG_FILES = ("samples.png", "reconstructions.png", "interpolation.png", "latent_map.png")
GRID_SAMPLES = 64
RECONSTRUCTIONS = 32
INTERPOLATION_PAIRS, INTERPOLATION_STEPS = 8, 10


def likelihood_kind(likelihood: str, data_variant: str) -> tuple[str, str]:
    """(short kind, sentence) saying what the model's log p(x|z) makes of the test data.

    Only the first three are likelihoods; a Bernoulli on grey levels is a summed BCE whose
    "NLL" would have an entropy floor of about 45 nats per image, so it is never called one.
    """
    if likelihood == "bernoulli" and data_variant == "binarized":
        return (
            "discrete_nll_binarized",
            "NLL of binarized MNIST under a Bernoulli decoder, in nats per image: comparable "
            "to the published table (Burda et al. 2015, Table 1) when k is large",
        )
    if likelihood == "continuous_bernoulli" and data_variant == "continuous":
        return (
            "density_nll_continuous_bernoulli_greylevels",
            "negative log-density of grey levels under a continuous Bernoulli decoder: a "
            "likelihood of its own, not comparable to binarized-MNIST NLLs",
        )
    if likelihood == "continuous_bernoulli" and data_variant == "binarized":
        return (
            "density_nll_continuous_bernoulli_binarized",
            "negative log-density of binarized pixels under a continuous Bernoulli decoder: "
            "a likelihood of its own, not comparable to discrete NLLs",
        )
    return (
        "not_a_likelihood_bce_greylevels",
        "summed binary cross-entropy on grey levels: not a likelihood, so no NLL is reported; "
        "the IWAE figure is a bound of that objective only (iwae_bound_not_a_likelihood)",
    )


def _captions(data_variant: str, likelihood: str) -> dict[str, str]:
    trained = f"{likelihood} decoder, trained on {VARIANT_LABELS[data_variant]}"
    return {
        "png_samples": f"samples.png: {GRID_SAMPLES} samples, decoder mean at z ~ N(0, I) "
        f"({trained})",
        "png_reconstructions": f"reconstructions.png: alternate rows are {RECONSTRUCTIONS} test "
        "images (seeded choice) and their "
        f"reconstructions, decoder mean at z = E_q[z|x] ({trained})",
        "png_interpolation": f"interpolation.png: each row a test image, {INTERPOLATION_STEPS} "
        "decoder means along the line between the two latent means, the other "
        f"test image ({trained})",
        "png_latent_map": "latent_map.png: E_q[z|x] of the test images, first two principal "
        "components when latent_dim > 2, coloured by true label (legend row: "
        f"digits 0-9 left to right, tab10 colours) ({trained})",
    }


def evaluate_model(
    model: nn.Module,
    splits: DatasetSplits,
    data_variant: str,
    out_dir: Path,
    config: EvalConfig,
    *,
    classifier: MnistClassifier | None = None,
    eval_batch_size: int = EVAL_BATCH_SIZE,
    iwae_max_rows: int | None = None,
) -> dict:
    """Score a trained VAE on the test split and write metrics.json, the per-example NLL and
    the PNGs into out_dir; returns the metrics.

    The test set is the fixed binarized draw for data_variant "binarized", grey levels for
    "continuous". The IWAE subset is select_subset(test size, iwae_test_size, seed): the same
    examples for every model evaluated with the same settings, which the promotion gate's
    example-by-example comparison relies on. Runs on the model's device.
    """
    iwae_k, iwae_test_size = config.iwae_k, config.iwae_test_size
    num_samples, seed = config.num_samples, config.seed
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    device = model_device(model)
    likelihood = getattr(getattr(model, "config", None), "likelihood", "bernoulli")
    kind, kind_sentence = likelihood_kind(likelihood, data_variant)
    is_likelihood = not kind.startswith("not_a_likelihood")
    x_test = split_inputs(splits, "test", data_variant).to(device)
    precision = resolve_precision(
        config.matmul_precision, device, field="evaluate.matmul_precision"
    )

    metrics: dict[str, float | int | str] = {
        "data_variant": data_variant,
        "data_variant_label": VARIANT_LABELS[data_variant],
        "likelihood": likelihood,
        "likelihood_kind": kind,
        "likelihood_kind_label": kind_sentence,
        "test_size": len(x_test),
        "seed": seed,
        "device": str(device),
        # The IWAE figures' matrix products (the gate re-scores the champion the same way).
        "iwae_precision": precision.name,
        "iwae_precision_reason": precision.reason,
    }

    with torch.inference_mode():
        elbo = elbo_summary(model, x_test, seed=seed, batch_size=eval_batch_size)
        metrics.update(
            {
                "test_neg_elbo": elbo.neg_elbo,
                "test_recon": elbo.recon,
                "test_kl": elbo.kl,
                "test_neg_elbo_unit": "nats per image",
                "test_neg_elbo_estimator": (
                    "ELBO, 1 sample of z per test image, analytic KL: an upper bound on -log p(x)"
                    if is_likelihood
                    else "ELBO of a summed BCE on grey levels, 1 sample of z, analytic KL: not a "
                    "likelihood bound"
                ),
            }
        )
        if is_likelihood:
            metrics["test_bits_per_dim"] = elbo.bits_per_dim
            metrics["test_bits_per_dim_estimator"] = "test_neg_elbo / (784 ln 2): an upper bound"

        t_iwae = time.perf_counter()
        iwae = iwae_nll(
            model,
            x_test,
            iwae_k,
            test_size=iwae_test_size,
            seed=seed,
            max_rows=iwae_max_rows,
            precision=precision.name,
        )
        iwae_seconds = time.perf_counter() - t_iwae
        subset = f"{len(iwae.indices)} of {len(x_test)} test images" + (
            f" (seeded subset, seed {seed})" if len(iwae.indices) < len(x_test) else ""
        )
        if is_likelihood:
            name, per_example_file = "test_nll_iwae", NLL_FILE
            estimator = (
                f"IWAE bound with k={iwae_k} importance samples on {subset}: an upper "
                "bound on -log p(x) in expectation, tighter as k grows; matrix products in "
                f"{precision.name}"
            )
        else:
            name, per_example_file = "test_neg_iwae_bce_greylevels", NOT_A_LIKELIHOOD_FILE
            estimator = (
                f"iwae_bound_not_a_likelihood: IWAE bound with k={iwae_k} on {subset} "
                f"of the summed-BCE objective on grey levels; matrix products in {precision.name}"
            )
        metrics.update(
            {
                name: iwae.mean,
                f"{name}_stderr": iwae.stderr,
                f"{name}_estimator": estimator,
                "iwae_k": iwae_k,
                "iwae_test_size": iwae_test_size,
                "iwae_num_examples": len(iwae.indices),
                "iwae_seconds": iwae_seconds,
                "per_example_file": per_example_file,
                "per_example_index_file": INDEX_FILE,
            }
        )
        if is_likelihood:
            metrics["test_nll_iwae_bits_per_dim"] = float(bits_per_dim(iwae.mean))
        np.save(out_dir / per_example_file, iwae.nll.astype(np.float64))
        np.save(out_dir / INDEX_FILE, iwae.indices.astype(np.int64))

        # The holdout, all of it, with the same estimator: what the promotion gate decides on
        # (example by example against the champion), so the test set never decides anything.
        x_holdout = split_inputs(splits, "holdout", data_variant).to(device)
        if len(x_holdout):
            holdout = iwae_nll(
                model,
                x_holdout,
                iwae_k,
                test_size=0,
                seed=seed,
                max_rows=iwae_max_rows,
                precision=precision.name,
            )
            metrics.update(
                {
                    f"holdout_{name.removeprefix('test_')}": holdout.mean,
                    "holdout_num_examples": len(holdout.indices),
                    "holdout_estimator": f"as {name}, on all {len(x_holdout)} holdout images "
                    "(carved from the training data): the promotion gate's data, not a test "
                    "figure",
                    "holdout_per_example_file": HOLDOUT_PREFIX + per_example_file,
                    "holdout_per_example_index_file": HOLDOUT_PREFIX + INDEX_FILE,
                }
            )
            np.save(out_dir / (HOLDOUT_PREFIX + per_example_file), holdout.nll.astype(np.float64))
            np.save(out_dir / (HOLDOUT_PREFIX + INDEX_FILE), holdout.indices.astype(np.int64))

        count, _ = active_units(model, x_test, batch_size=eval_batch_size)
        metrics.update(
            {
                "active_units": count,
                "active_units_threshold": ACTIVE_UNIT_THRESHOLD,
                "latent_dim": int(getattr(model, "latent_dim", 0)),
                "active_units_estimator": "units u with Cov_x(E_q[z_u|x]) > 0.01 on the test set "
                "(Burda et al. 2015)",
            }
        )

        gen = torch.Generator(device=device).manual_seed(seed)
        samples = model.sample(max(num_samples, GRID_SAMPLES), generator=gen).float()
        save_sample_grid(samples[:GRID_SAMPLES], out_dir / "samples.png")
        # A seeded spread of the test set: stored test sets are often in class order.
        shown = torch.as_tensor(select_subset(len(x_test), RECONSTRUCTIONS, seed))
        save_reconstructions(model, x_test[shown.to(device)], out_dir / "reconstructions.png")
        pairs = torch.as_tensor(
            np.random.default_rng(seed).choice(
                len(x_test), size=(min(INTERPOLATION_PAIRS, len(x_test) // 2), 2), replace=False
            )
        )
        save_interpolation(
            model,
            x_test[pairs[:, 0]],
            x_test[pairs[:, 1]],
            out_dir / "interpolation.png",
            steps=INTERPOLATION_STEPS,
        )
        save_model_latent_map(model, x_test, splits.test_labels, out_dir / "latent_map.png")
        metrics.update(_captions(data_variant, likelihood))

        if classifier is not None and num_samples > 0:
            classifier = classifier.to(device).eval()
            report = sample_quality_report(
                classifier,
                samples[:num_samples],
                splits.test_images,
                splits.train_images,
                num_samples,
                seed=seed,
            )
            metrics.update(report)
            metrics["sq_generated"] = (
                "decoder mean at z ~ N(0, I) (grey levels in [0, 1]), "
                "against grey-level test images"
            )
        else:
            metrics["sq_status"] = (
                "skipped: no classifier given" if classifier is None else "skipped: num_samples = 0"
            )
        metrics["sq_num_samples"] = int(metrics.get("sq_num_samples", 0))

    metrics["eval_seconds"] = time.perf_counter() - t0
    atomic_write_text(out_dir / METRICS_NAME, json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_per_example(eval_dir: Path, split: str = "test") -> tuple[np.ndarray, np.ndarray, dict]:
    """The per-example IWAE figures evaluate_model wrote for ``split`` (test, or holdout: what
    the promotion gate compares, example by example, between two models), their indices in
    that split, and the metrics.

    Read through metrics["per_example_file"], so a summed-BCE run (not a likelihood) can only be
    compared under its own name, never mistaken for an NLL.
    """
    eval_dir = Path(eval_dir)
    metrics = json.loads((eval_dir / METRICS_NAME).read_text())
    prefix = "" if split == "test" else f"{split}_"
    if f"{prefix}per_example_file" not in metrics:
        raise ProcessedDataError(
            f"{eval_dir / METRICS_NAME}: expected per-example figures of the {split} split, "
            "found none (was the data prepared with data.holdout_size >= 1?)"
        )
    values = np.load(eval_dir / metrics[f"{prefix}per_example_file"], allow_pickle=False)
    indices = np.load(eval_dir / metrics[f"{prefix}per_example_index_file"], allow_pickle=False)
    return values, indices, metrics


def _default_iwae(device: torch.device) -> tuple[int, int]:
    # (k, test size): the published protocol on a GPU; a CPU-sized estimate otherwise.
    return (5000, 0) if device.type == "cuda" else (100, 1000)


def main(argv: list[str] | None = None) -> int:
    """CLI: load a saved model and a processed-data folder, evaluate, print the headline figures."""
    parser = argparse.ArgumentParser(
        prog="python -m vae_core.evaluation.report",
        description="Evaluate a trained VAE: likelihood, sample quality and PNG figures.",
    )
    parser.add_argument(
        "--model-dir", required=True, type=Path, help="folder with model.pt and model_config.json"
    )
    parser.add_argument("--processed", required=True, type=Path, help="processed-data folder")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument(
        "--classifier",
        type=Path,
        default=None,
        help="classifier folder (omit to skip sample quality)",
    )
    parser.add_argument(
        "--data-variant",
        choices=DATA_VARIANTS,
        default=None,
        help="default: the data_variant saved in model_config.json",
    )
    parser.add_argument(
        "--iwae-k", type=int, default=None, help="default: 5000 on CUDA, 100 on CPU"
    )
    parser.add_argument(
        "--iwae-test-size",
        type=int,
        default=None,
        help="0 = the whole test set; default: 0 on CUDA, 1000 on CPU",
    )
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from vae_core.data import DataError, load_processed
    from vae_core.training.device import pick_device

    try:
        device = pick_device(args.device)
        splits = load_processed(args.processed)
        model = load_model(args.model_dir, device)
        saved = json.loads((args.model_dir / MODEL_CONFIG_NAME).read_text())
        classifier = load_classifier(args.classifier, device) if args.classifier else None
    except (DataError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data_variant = args.data_variant or saved.get("data_variant")
    if data_variant is None:
        print(
            f"error: {args.model_dir / MODEL_CONFIG_NAME} names no data_variant; pass "
            "--data-variant",
            file=sys.stderr,
        )
        return 2
    default_k, default_size = _default_iwae(device)
    try:
        config = EvalConfig(
            iwae_k=args.iwae_k if args.iwae_k is not None else default_k,
            iwae_test_size=args.iwae_test_size if args.iwae_test_size is not None else default_size,
            num_samples=args.num_samples,
            seed=args.seed,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = evaluate_model(model, splits, data_variant, args.out, config, classifier=classifier)
    for key, value in metrics.items():
        if isinstance(value, float | int):
            print(f"{key} {value:.6g}" if isinstance(value, float) else f"{key} {value}")
    print(f"wrote {args.out / METRICS_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
