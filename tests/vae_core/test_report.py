"""evaluate_model end to end on a tiny model and synthetic data, and the two CLIs."""

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import random_splits
from torchvision.io import read_image

from vae_core.config import EvalConfig, TrainConfig
from vae_core.data import DatasetSplits, save_processed
from vae_core.evaluation import MnistClassifier, evaluate_model, load_classifier, load_per_example
from vae_core.evaluation import classifier as classifier_module
from vae_core.evaluation import report as report_module
from vae_core.models import build_vae
from vae_core.models.vae import VAE, VAEConfig
from vae_core.training.checkpoint import save_model

TIMING_KEYS = {"eval_seconds", "iwae_seconds"}


def _splits() -> DatasetSplits:
    return random_splits({"train": 120, "val": 20, "holdout": 16, "test": 40})


def _vae(likelihood: str = "bernoulli") -> VAE:
    config = VAEConfig(hidden_sizes=[32], latent_dim=3, likelihood=likelihood)
    return build_vae(config, seed=0).eval()


SETTINGS = EvalConfig(iwae_k=20, iwae_test_size=15, num_samples=30, seed=3)


def test_evaluate_model_writes_labelled_metrics_nll_and_pngs(tmp_path):
    torch.manual_seed(0)
    clf = MnistClassifier().eval()
    metrics = evaluate_model(_vae(), _splits(), "binarized", tmp_path, SETTINGS, classifier=clf)
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    figures = """test_neg_elbo test_recon test_kl test_bits_per_dim test_nll_iwae
        test_nll_iwae_stderr test_nll_iwae_bits_per_dim active_units sq_fd sq_kid sq_precision
        sq_recall sq_density sq_coverage sq_inception_score sq_label_frac_0 sq_ref_fd sq_ref_kid
        sq_ref_coverage sq_ref_inception_score"""
    for key in figures.split():
        assert isinstance(metrics[key], float | int) and math.isfinite(metrics[key]), key
    assert metrics["test_neg_elbo"] == pytest.approx(metrics["test_recon"] + metrics["test_kl"])
    assert metrics["iwae_k"] == 20 and metrics["iwae_test_size"] == 15
    assert metrics["iwae_num_examples"] == 15 and metrics["sq_num_samples"] == 30
    # KID's settings as computed: 30 samples against 30 test images, 50 subsets of 15.
    assert (metrics["sq_kid_subsets"], metrics["sq_kid_subset_size"]) == (50, 15)
    assert metrics["sq_kid_std"] > 0 and metrics["sq_ref_kid_std"] > 0
    assert "50 subset(s) of 15 features" in metrics["sq_kid_estimator"]
    assert "seed 3" in metrics["sq_kid_estimator"]
    assert metrics["data_variant"] == "binarized"
    assert metrics["likelihood_kind"] == "discrete_nll_binarized"
    assert "k=20" in metrics["test_nll_iwae_estimator"]
    assert "15 of 40" in metrics["test_nll_iwae_estimator"]
    assert "ELBO" in metrics["test_neg_elbo_estimator"]
    assert all(isinstance(v, float | int | str) for v in metrics.values())
    # The holdout (the gate's data) is scored whole, with the same estimator, apart from test.
    holdout_nll, holdout_index, _ = load_per_example(tmp_path, "holdout")
    np.testing.assert_array_equal(holdout_index, np.arange(16))
    assert metrics["holdout_num_examples"] == 16
    assert holdout_nll.mean() == pytest.approx(metrics["holdout_nll_iwae"])
    assert "not a test figure" in metrics["holdout_estimator"]

    nll, index = (np.load(tmp_path / f"per_example_{n}.npy") for n in ("nll", "index"))
    assert nll.dtype == np.float64 and nll.shape == (15,)
    assert index.dtype == np.int64 and index.shape == (15,) and np.all(np.diff(index) > 0)
    assert nll.mean() == pytest.approx(metrics["test_nll_iwae"])
    for name in ("samples.png", "reconstructions.png", "interpolation.png", "latent_map.png"):
        assert read_image(str(tmp_path / name)).shape[0] in (1, 3), name
        assert f"png_{name[:-4]}" in metrics


def test_evaluation_is_deterministic_and_subsets_agree_with_the_full_set(tmp_path):
    model, splits = _vae(), _splits()
    a, b = (evaluate_model(model, splits, "binarized", tmp_path / d, SETTINGS) for d in "ab")
    for key in TIMING_KEYS:
        a.pop(key, None), b.pop(key, None)
    assert a == b
    (nll_a, index_a, _), (nll_b, index_b, _) = (load_per_example(tmp_path / d) for d in "ab")
    np.testing.assert_array_equal(nll_a, nll_b)
    np.testing.assert_array_equal(index_a, index_b)
    # The whole test set: the same per-example figures at the subset's indices (per-example
    # seeding; other batch shapes change only float32 rounding, at most 1e-6 relative: see
    # FLOAT32_RTOL in test_likelihood.py), and the IWAE bound is tighter than the ELBO.
    whole = replace(SETTINGS, iwae_test_size=0)
    full = evaluate_model(model, splits, "binarized", tmp_path / "full", whole)
    nll_full, index_full, _ = load_per_example(tmp_path / "full")
    np.testing.assert_array_equal(index_full, np.arange(40))
    np.testing.assert_allclose(nll_full[index_a], nll_a, rtol=16 * 2.0**-24, atol=0)
    assert full["test_nll_iwae"] < full["test_neg_elbo"]
    assert "sq_status" in full and "sq_fd" not in full


def test_summed_bce_on_grey_levels_is_never_called_a_likelihood(tmp_path):
    metrics = evaluate_model(_vae(), _splits(), "continuous", tmp_path, SETTINGS)
    assert metrics["likelihood_kind"] == "not_a_likelihood_bce_greylevels"
    assert not any("nll" in key for key in metrics if key != "per_example_index_file")
    assert "test_bits_per_dim" not in metrics
    assert "not a likelihood" in metrics["test_neg_elbo_estimator"]
    assert metrics["test_neg_iwae_bce_greylevels_estimator"].startswith(
        "iwae_bound_not_a_likelihood"
    )
    assert not (tmp_path / "per_example_nll.npy").exists()
    values, index, loaded = load_per_example(tmp_path)
    assert loaded["per_example_file"] == "per_example_neg_iwae_bce_greylevels.npy"
    assert values.shape == index.shape == (15,)
    # The continuous Bernoulli on grey levels is a density: it gets an NLL of its own.
    cb = evaluate_model(
        _vae("continuous_bernoulli"), _splits(), "continuous", tmp_path / "cb", SETTINGS
    )
    assert cb["likelihood_kind"] == "density_nll_continuous_bernoulli_greylevels"
    assert "test_nll_iwae" in cb and "not comparable" in cb["likelihood_kind_label"]
    # Bad settings are refused where they are made.
    with pytest.raises(ValueError, match="train.data_variant = 'grey' is not allowed"):
        TrainConfig(data_variant="grey")
    with pytest.raises(ValueError, match="evaluate.iwae_k = 0 is not allowed"):
        replace(SETTINGS, iwae_k=0)


def test_classifier_and_report_command_lines_and_a_deterministic_classifier(tmp_path, capsys):
    splits = _splits()
    processed, clf_dir = tmp_path / "processed", tmp_path / "clf"
    rows = {"train": np.arange(120), "val": np.arange(120, 140), "holdout": np.arange(140, 156)}
    save_processed(splits, rows, processed)
    argv = f"--processed {processed} --out {clf_dir} --epochs 1 --device cpu".split()
    assert classifier_module.main(argv) == 0
    assert "test_accuracy" in capsys.readouterr().out
    clf = load_classifier(clf_dir)
    saved = json.loads((clf_dir / "classifier.json").read_text())
    assert saved["config"]["feature_dim"] == clf.num_features == 128
    assert 0.0 <= saved["metrics"]["test_accuracy"] <= 1.0

    model = _vae()
    save_model(model, model.config.to_dict() | {"data_variant": "binarized"}, tmp_path / "model")
    argv = f"--model-dir {tmp_path / 'model'} --processed {processed} --out {tmp_path / 'eval'}"
    argv += f" --classifier {clf_dir} --iwae-k 10 --iwae-test-size 12 --num-samples 20"
    assert report_module.main([*argv.split(), "--device", "cpu"]) == 0
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["data_variant"] == "binarized" and metrics["iwae_k"] == 10
    assert metrics["sq_num_samples"] == 20 and "test_nll_iwae" in capsys.readouterr().out
    argv = f"--model-dir {tmp_path / 'nothing'} --processed {processed} --out {tmp_path / 'x'}"
    assert report_module.main(argv.split()) == 2
    # Training the classifier is deterministic, and it round-trips.
    settings = dict(epochs=1, batch_size=32, seed=5, device="cpu")
    (a, metrics), (b, _) = (classifier_module.train_classifier(splits, **settings) for _ in "ab")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    classifier_module.save_classifier(a, tmp_path / "again", metrics)
    loaded = load_classifier(tmp_path / "again")
    x = splits.test_images[:8]
    assert torch.equal(loaded.features(x), a.eval().features(x))
    assert loaded.features(x).shape == (8, 128) and loaded(x).shape == (8, 10)


def test_bf16_evaluation_records_its_precision_beside_the_figures_it_made(tmp_path):
    fp32, bf16 = (
        evaluate_model(
            _vae(), _splits(), "binarized", tmp_path / p, replace(SETTINGS, matmul_precision=p)
        )
        for p in ("fp32", "bf16")
    )
    assert (fp32["iwae_precision"], bf16["iwae_precision"]) == ("fp32", "bf16")
    assert bf16["test_nll_iwae_estimator"].endswith("matrix products in bf16")
    assert bf16["iwae_precision_reason"] == "bf16, as set"
    # The same examples and importance samples: the figures differ by bf16's rounding only.
    a, b = (load_per_example(tmp_path / p, "holdout")[0] for p in ("fp32", "bf16"))
    assert not np.array_equal(a, b) and np.abs(a - b).max() < 0.5
    assert abs(bf16["test_nll_iwae"] - fp32["test_nll_iwae"]) < 0.05
