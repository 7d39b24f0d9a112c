"""Sample-quality statistics: agreement with torchmetrics and brute-force references on random
features, and sanity orderings on the embedded MNIST digits with a briefly trained classifier."""

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance
from torchvision.transforms.functional import gaussian_blur

from vae_core.data import load_splits
from vae_core.evaluation import sample_quality as sq
from vae_core.evaluation.classifier import as_images, predict, train_classifier
from vae_core.models.vae import VAE, VAEConfig
from vae_core.training import TrainConfig, Trainer

# A classifier and a full-size VAE trained for three epochs each on the embedded digits.
pytestmark = pytest.mark.slow


class Identity(nn.Module):
    """A 'feature extractor' that returns its input: torchmetrics then sees our features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _features(n: int, dim: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / dim**0.5
    return (torch.randn(n, dim, generator=gen, dtype=torch.float64) @ mixing) * scale + shift


def _torchmetrics(metric_class, real, fake, seed: int = 0, **settings):
    """The figure of a torchmetrics image metric fed our features as they are."""
    metric = metric_class(feature=Identity(real.shape[1]), **settings)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    torch.manual_seed(seed)  # KID draws its subsets from the global generator, as ours does
    out = metric.compute()
    return tuple(float(v) for v in out) if isinstance(out, tuple) else float(out)


@pytest.mark.parametrize("shift,scale", [(0.0, 1.0), (0.3, 1.0), (0.0, 2.0), (1.0, 0.5)])
def test_frechet_distance_agrees_with_torchmetrics_is_symmetric_and_zero_on_itself(shift, scale):
    real, fake = _features(400, 16, 0), _features(300, 16, 1, shift, scale)
    expected = _torchmetrics(FrechetInceptionDistance, real, fake)
    stats_real, stats_fake = sq.feature_statistics(real), sq.feature_statistics(fake)
    for a, b in ((stats_fake, stats_real), (stats_real, stats_fake)):
        assert sq.frechet_distance(*a, *b) == pytest.approx(expected, rel=1e-6, abs=1e-9)
    assert sq.frechet_distance(*stats_fake, *stats_fake) == pytest.approx(0.0, abs=1e-9)


def test_kid_agrees_with_torchmetrics_on_whole_sets_and_on_seeded_subsets():
    real, fake = _features(200, 12, 4), _features(200, 12, 5, 0.2, 1.2)
    expected, _ = _torchmetrics(KernelInceptionDistance, real, fake, subsets=1, subset_size=200)
    mean, std = sq.kernel_inception_distance(real, fake, subsets=1, subset_size=200)
    assert mean == pytest.approx(expected, rel=1e-9) and std == 0.0
    # With subsets, torchmetrics draws from the global generator in the same order as ours.
    settings = dict(subsets=7, subset_size=50)
    expected = _torchmetrics(KernelInceptionDistance, real, fake, seed=11, **settings)
    assert sq.kernel_inception_distance(real, fake, seed=11, **settings) == pytest.approx(
        expected, rel=1e-9
    )


def test_kid_at_the_defaults_uses_several_subsets_and_reports_a_real_std_and_its_limits():
    """1,000 samples against 1,000 at the defaults (50 subsets of 1,000): the subsets used to
    collapse into one, the std was 0. Now 50 seeded subsets of 500, as torchmetrics draws."""
    real, fake = _features(1000, 12, 8), _features(1000, 12, 9, 0.2, 1.2)
    assert sq.kid_subset_plan(1000, 1000, 50, 1000) == (50, 500)
    mean, std = sq.kernel_inception_distance(real, fake, seed=3)
    assert std > 0.01 * abs(mean) and mean > 0
    settings = dict(subsets=50, subset_size=500)
    expected = _torchmetrics(KernelInceptionDistance, real, fake, seed=3, **settings)
    assert (mean, std) == pytest.approx(expected, rel=1e-9)
    # Deterministic in its seed: the same seed the same figures, another seed other subsets.
    assert sq.kernel_inception_distance(real, fake, seed=3) == (mean, std)
    other_mean, other_std = sq.kernel_inception_distance(real, fake, seed=4)
    assert (other_mean, other_std) != (mean, std)
    # Another candidate set: other figures, and again a spread over the subsets.
    mean2, std2 = sq.kernel_inception_distance(real, _features(1000, 12, 10, 0.2, 1.2), seed=3)
    assert std2 > 0.01 * abs(mean2) and mean2 != mean
    assert sq.kid_subset_plan(1000, 1000, 1, 1000) == (1, 1000)  # one subset: the whole sets
    assert sq.kid_subset_plan(1000, 600, 10, 1000) == (10, 300)  # half the smaller set
    assert sq.kid_subset_plan(5000, 5000, 100, 1000) == (100, 1000)  # asked size fits
    real, fake = _features(3, 4, 11), _features(3, 4, 12)
    with pytest.raises(ValueError, match="expected subsets of >= 2 features, found 1"):
        sq.kernel_inception_distance(real, fake, subsets=5, subset_size=3)
    assert sq.kernel_inception_distance(real, fake, subsets=1, subset_size=3)[1] == 0.0
    with pytest.raises(ValueError, match="subsets >= 1"):
        sq.kid_subset_plan(10, 10, 0, 5)


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    return np.sort(cdist(x, x), axis=1)[:, k]


def test_precision_recall_density_coverage_match_a_brute_force_reference():
    real, fake = _features(150, 6, 6), _features(120, 6, 7, 0.4, 1.3)
    r, f = real.numpy(), fake.numpy()
    d_rf = cdist(r, f)
    radii_r, radii_f = _kth_radius(r, 3)[:, None], _kth_radius(f, 3)[:, None]
    precision = (d_rf <= radii_r).any(axis=0).mean()
    recall = (d_rf.transpose() <= radii_f).any(axis=0).mean()
    radii5 = _kth_radius(r, 5)[:, None]
    density = (d_rf < radii5).sum(axis=0).mean() / 5
    coverage = (d_rf.min(axis=1) < radii5[:, 0]).mean()
    assert sq.precision_recall(real, fake, k=3) == pytest.approx((precision, recall))
    assert sq.density_coverage(real, fake, k=5) == pytest.approx((density, coverage))
    assert 0 < precision < 1 and 0 < recall < 1 and 0 < coverage < 1


def test_inception_score_and_label_histogram_on_known_distributions():
    confident_even = torch.eye(10).repeat(30, 1)  # sharp and every class equally often
    assert sq.inception_score(confident_even, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    one_class = torch.zeros(300, 10)
    one_class[:, 4] = 1
    assert sq.inception_score(one_class)[0] == pytest.approx(1.0, rel=1e-6)
    assert sq.inception_score(torch.full((300, 10), 0.1))[0] == pytest.approx(1.0, rel=1e-6)
    np.testing.assert_allclose(sq.label_histogram(one_class), np.eye(10)[4])
    np.testing.assert_allclose(
        sq.label_histogram(torch.tensor([0, 0, 1, 9])), [0.5, 0.25, 0, 0, 0, 0, 0, 0, 0, 0.25]
    )


@pytest.fixture(scope="module")
def embedded():
    return load_splits("embedded", "mnist", val_size=500)


@pytest.fixture(scope="module")
def classifier(embedded):
    model, metrics = train_classifier(embedded, epochs=3, seed=0, device="cpu")
    assert metrics["test_accuracy"] > 0.85, metrics["test_accuracy"]
    return model


def _rows(classifier, reference, candidates):
    ref_f, ref_p = predict(classifier, reference)
    return {
        n: sq.quality_metrics(*predict(classifier, x), ref_f, ref_p) for n, x in candidates.items()
    }


def test_real_digits_score_best_and_degradations_score_progressively_worse(embedded, classifier):
    gen = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(embedded.train_images), generator=gen)[:1000]
    real = as_images(embedded.train_images[pick])
    shuffled = torch.stack([im.flatten()[torch.randperm(784, generator=gen)] for im in real])
    candidates = {
        "real": real,
        "blur1": gaussian_blur(real, 5, 1.0),
        "blur2": gaussian_blur(real, 9, 2.0),
        "shuffled": shuffled.view(-1, 1, 28, 28),
        "noise": torch.rand(1000, 1, 28, 28, generator=gen),
    }
    rows = _rows(classifier, as_images(embedded.test_images), candidates)
    order = ["real", "blur1", "blur2", "shuffled", "noise"]
    fd, kid = ([rows[n][key] for n in order] for key in ("fd", "kid"))
    # FD and KID: strictly worse along real < blur sigma 1 < blur sigma 2 < shuffled pixels.
    assert fd[0] < fd[1] < fd[2] < fd[3], fd
    assert kid[0] < kid[1] < kid[2] < kid[3], kid
    # Noise: this classifier maps it to one tight cluster (one or two predicted labels), far
    # from digits but near their mean feature. FD sees the collapsed covariance and ranks it far
    # worse than any blur; KID's cubic kernel only ranks it below mild blur (measured over
    # classifier seeds 0-5: noise against blur sigma 2 and shuffled pixels flips with the seed).
    assert fd[4] > 1.5 * fd[2] and kid[4] > kid[1], (fd, kid)
    assert rows["noise"]["label_tv"] > 0.5
    assert fd[0] == min(fd) and kid[0] == min(kid)
    # Diversity and classifier confidence: the full expected order, noise last.
    for key in ("recall", "coverage"):
        values = [rows[n][key] for n in order]
        assert values[0] > values[1] > values[2] > values[3] >= values[4], (key, values)
    inception = [rows[n]["inception_score"] for n in order]
    assert all(a > b for a, b in zip(inception, inception[1:], strict=False)), inception
    assert rows["real"]["precision"] > 0.8 and rows["real"]["coverage"] > 0.85
    assert rows["real"]["label_tv"] < 0.1


def test_briefly_trained_vae_lands_between_real_digits_and_noise(embedded, classifier):
    torch.manual_seed(0)  # the full 784-400-20 model: a few epochs give recognisable digits
    config = TrainConfig(epochs=3, lr=3e-3, lr_schedule="constant", patience=0, device="cpu")
    trainer = Trainer(VAE(VAEConfig()), config, progress=False)
    trainer.fit(embedded.train_images, embedded.val_images)
    samples = trainer.model.sample(1000, generator=torch.Generator().manual_seed(1))
    test, train = embedded.test_images, embedded.train_images
    report = sq.sample_quality_report(classifier, samples, test, train, n=1000)
    noise = torch.rand(1000, 1, 28, 28, generator=torch.Generator().manual_seed(2))
    noise_row = _rows(classifier, as_images(test), {"noise": noise})["noise"]
    assert report["sq_num_samples"] == 1000 and report["sq_num_reference"] == 1000
    # KID over the default 50 subsets, half the sets each: a real spread, and logged as used.
    assert (report["sq_kid_subsets"], report["sq_kid_subset_size"]) == (50, 500)
    assert report["sq_kid_std"] > 0 and report["sq_ref_kid_std"] > 0
    assert "50 subset(s) of 500 features" in report["sq_kid_estimator"]
    assert report["sq_ref_fd"] < report["sq_fd"] < noise_row["fd"]
    assert report["sq_ref_kid"] < report["sq_kid"]  # KID against noise: see the test above
    for key in ("recall", "coverage", "inception_score"):
        assert report[f"sq_ref_{key}"] > report[f"sq_{key}"] > noise_row[key], key
    assert 0 < report["sq_label_tv"] < 1 and report["sq_ref_label_tv"] < 0.1
