"""Sample-quality statistics in the feature space of the in-house MNIST classifier.

Each figure is reported beside the real-versus-real reference (training images against test
images, same sizes): with a few thousand samples in a 128-d space every one of these statistics
is biased, and only the distance to that reference row says how far from "as good as real data"
a model is. Written with torch.linalg alone (float64); the tests check the Frechet distance and
KID against torchmetrics.

- Frechet distance: Heusel et al. (2017), with the classifier's features instead of Inception's.
- KID: Binkowski et al. (2018), unbiased MMD^2 with the kernel (x.y / d + 1)^3, over subsets.
- Precision / recall: Kynkaanniemi et al. (2019), k-NN hyperspheres around each feature.
- Density / coverage: Naeem et al. (2020), the same balls around the real features only.
- Inception Score: Salimans et al. (2016), with this classifier's p(y|x).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vae_core.evaluation.classifier import MnistClassifier, as_images, predict
from vae_core.evaluation.likelihood import select_subset

NUM_CLASSES = 10
FEATURE_SPACE = "penultimate layer (128-d) of the in-house MNIST CNN (evaluation.classifier)"


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (N, F) features, in float64: the Gaussian FD compares."""
    f = features.double()
    if len(f) < 2:
        raise ValueError(f"feature_statistics: expected at least 2 feature vectors, found {len(f)}")
    mu = f.mean(dim=0)
    centred = f - mu
    sigma = centred.T @ centred / (len(f) - 1)
    return mu, sigma


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric PSD matrix by eigendecomposition; round-off negatives -> 0."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(
    mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor
) -> float:
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), in float64.

    tr((S1 S2)^1/2) is taken as the sum of square roots of the eigenvalues of the symmetric PSD
    matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which avoids the complex round-off of a
    general matrix square root.
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    root1 = _sqrtm_psd(sigma1)
    middle = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return float(value)


def _polynomial_mmd2(
    x: torch.Tensor, y: torch.Tensor, degree: int, gamma: float, coef: float
) -> float:
    m = len(x)
    k_xx = (x @ x.T * gamma + coef).pow(degree)
    k_yy = (y @ y.T * gamma + coef).pow(degree)
    k_xy = (x @ y.T * gamma + coef).pow(degree)
    off_xx = k_xx.sum() - k_xx.diagonal().sum()
    off_yy = k_yy.sum() - k_yy.diagonal().sum()
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kid_subset_plan(n_a: int, n_b: int, subsets: int, subset_size: int) -> tuple[int, int]:
    """How many subsets KID draws, and of what size, for sets of n_a and n_b features.

    One subset may take the whole of the smaller set (its std is then 0: there is one value).
    Several subsets take at most half of the smaller set each, so that they differ and their
    spread is a real standard deviation: subsets as large as the sets (the old behaviour at
    the defaults, 1,000 of 1,000 samples) are all the same subset up to order.
    """
    subsets, subset_size, smaller = int(subsets), int(subset_size), min(int(n_a), int(n_b))
    if subsets < 1 or subset_size < 2:
        raise ValueError(
            f"kernel_inception_distance: expected subsets >= 1 and subset_size >= 2, found "
            f"{subsets} and {subset_size}"
        )
    if subsets == 1:
        return 1, min(subset_size, smaller)
    return subsets, min(subset_size, smaller // 2)


def kernel_inception_distance(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    subsets: int = 50,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 0,
) -> tuple[float, float]:
    """Mean and standard deviation over subsets of the unbiased MMD^2 with a polynomial kernel.

    Unlike FD it is unbiased in the number of samples, so it compares across sample sizes.
    As in Binkowski et al. and torchmetrics, each subset draws subset_size features of each
    set without replacement, and the subsets are drawn independently of each other (with
    replacement across subsets), from one generator seeded with `seed`: the same seed gives
    the same figures, and the same ones as torchmetrics' KID after ``torch.manual_seed(seed)``.
    Subset count and size follow `kid_subset_plan` (at most half of the smaller set each
    when there are several).
    """
    a, b = features_a.double(), features_b.double()
    subsets, size = kid_subset_plan(len(a), len(b), subsets, subset_size)
    if size < 2:
        raise ValueError(
            f"kernel_inception_distance: expected subsets of >= 2 features, found {size} "
            f"({subsets} subset(s) of sets of {len(a)} and {len(b)} features)"
        )
    gamma = 1.0 / a.shape[1] if gamma is None else gamma
    gen = torch.Generator().manual_seed(int(seed))
    scores = []
    for _ in range(subsets):
        ia = torch.randperm(len(a), generator=gen)[:size].to(a.device)
        ib = torch.randperm(len(b), generator=gen)[:size].to(b.device)
        scores.append(_polynomial_mmd2(a[ia], b[ib], degree, gamma, coef))
    values = torch.tensor(scores, dtype=torch.float64)
    return float(values.mean()), float(values.std(unbiased=False))


def _pairwise_distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    return torch.cat([torch.cdist(x[i : i + chunk], y) for i in range(0, len(x), chunk)])


def _knn_radii(features: torch.Tensor, k: int, chunk: int = 1024) -> torch.Tensor:
    """Distance from each feature to its k-th nearest neighbour within the same set (not itself)."""
    if len(features) <= k:
        raise ValueError(f"k-NN radii: expected more than k={k} features, found {len(features)}")
    radii = []
    for i in range(0, len(features), chunk):
        d = torch.cdist(features[i : i + chunk], features)
        # The smallest distance is each point to itself (0); the (k+1)-th smallest is its k-th NN.
        radii.append(d.topk(k + 1, dim=1, largest=False).values[:, k])
    return torch.cat(radii)


def _inside_manifold(
    queries: torch.Tensor, support: torch.Tensor, radii: torch.Tensor
) -> torch.Tensor:
    """For each query: is it inside any ball B(support_i, radii_i)?"""
    inside = [
        (torch.cdist(queries[i : i + 1024], support) <= radii[None, :]).any(dim=1)
        for i in range(0, len(queries), 1024)
    ]
    return torch.cat(inside)


def precision_recall(
    real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Precision: the fraction of generated samples inside the real manifold (fidelity).
    Recall: the fraction of real samples inside the generated manifold (diversity).
    Each manifold is the union of balls around its points with radius the k-th NN distance.
    """
    real, fake = real_features.double(), fake_features.double()
    precision = _inside_manifold(fake, real, _knn_radii(real, k)).double().mean()
    recall = _inside_manifold(real, fake, _knn_radii(fake, k)).double().mean()
    return float(precision), float(recall)


def density_coverage(
    real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 5
) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020), from balls around the real features only.

    Density: how many real balls a generated sample falls in, / k, averaged (can exceed 1;
    robust to real outliers). Coverage: the fraction of real balls holding a generated sample.
    """
    real, fake = real_features.double(), fake_features.double()
    radii = _knn_radii(real, k)
    counts = torch.zeros(len(fake), dtype=torch.float64, device=real.device)
    covered = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    for i in range(0, len(real), 1024):
        # (real chunk, fake) distances against each real point's own radius.
        within = _pairwise_distances(real[i : i + 1024], fake) < radii[i : i + 1024, None]
        counts += within.sum(dim=0)
        covered[i : i + 1024] = within.any(dim=1)
    density = counts.mean() / k
    coverage = covered.double().mean()
    return float(density), float(coverage)


def inception_score(probs: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) with the classifier's p(y|x); mean and std over splits.

    High when each sample is classified confidently (sharp) and the classes are used evenly
    (diverse); at most the number of classes. It ignores the real data entirely, which is why
    it is reported beside the reference row. Rows are shuffled (seeded) before splitting, so a
    set stored in class order does not look like ten one-class sets.
    """
    p = probs.double().clamp_min(1e-12)
    p = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(int(seed))).to(p.device)]
    splits = max(1, min(splits, len(p)))
    scores = []
    for part in torch.tensor_split(p, splits):
        marginal = part.mean(dim=0, keepdim=True)
        kl = (part * (part.log() - marginal.log())).sum(dim=1).mean()
        scores.append(math.exp(float(kl)))
    values = torch.tensor(scores, dtype=torch.float64)
    std = float(values.std(unbiased=False)) if len(values) > 1 else 0.0
    return float(values.mean()), std


def label_histogram(probs_or_labels: torch.Tensor, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Fractions of predicted labels (arg-max of probabilities, or given integer labels).

    A model that drops a digit class shows it here even when FD looks fine.
    """
    labels = probs_or_labels.argmax(dim=1) if probs_or_labels.dim() == 2 else probs_or_labels
    counts = torch.bincount(labels.long().cpu(), minlength=num_classes).double()
    return (counts / max(1, len(labels))).numpy()


def quality_metrics(
    features: torch.Tensor,
    probs: torch.Tensor,
    reference_features: torch.Tensor,
    reference_probs: torch.Tensor,
    *,
    kid_subsets: int = 50,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    dc_k: int = 5,
    seed: int = 0,
) -> dict[str, float]:
    """One row of the report: a candidate set's features against the reference set's."""
    fd = frechet_distance(*feature_statistics(features), *feature_statistics(reference_features))
    kid, kid_std = kernel_inception_distance(
        features, reference_features, kid_subsets, kid_subset_size, seed=seed
    )
    precision, recall = precision_recall(reference_features, features, pr_k)
    density, coverage = density_coverage(reference_features, features, dc_k)
    is_mean, is_std = inception_score(probs, seed=seed)
    hist = label_histogram(probs)
    ref_hist = label_histogram(reference_probs)
    row = {
        "fd": fd,
        "kid": kid,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "density": density,
        "coverage": coverage,
        "inception_score": is_mean,
        "inception_score_std": is_std,
        # Total-variation distance between the predicted-label histograms (0 = same mix).
        "label_tv": float(0.5 * np.abs(hist - ref_hist).sum()),
    }
    row.update({f"label_frac_{c}": float(v) for c, v in enumerate(hist)})
    return row


def sample_quality_report(
    classifier: MnistClassifier,
    generated_images: torch.Tensor,
    reference_images: torch.Tensor,
    train_images: torch.Tensor,
    n: int,
    *,
    seed: int = 0,
    kid_subsets: int = 50,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    dc_k: int = 5,
    batch_size: int = 2048,
) -> dict[str, float | int | str]:
    """Generated-vs-reference row (`sq_*`) beside the real-vs-real row (`sq_ref_*`).

    Uses the first n generated images and seeded subsets of min(n, len(reference)) reference
    images and n training images, so both rows are computed at the same sample sizes, which
    the biased statistics (FD, precision/recall) need to be comparable. Images are uint8 or
    floats in [0, 1].
    """
    n = min(int(n), len(generated_images), len(train_images))
    if n < max(pr_k, dc_k) + 2:
        raise ValueError(f"sample quality: expected n >= {max(pr_k, dc_k) + 2} samples, found {n}")
    n_ref = min(n, len(reference_images))
    ref_idx = torch.as_tensor(select_subset(len(reference_images), n_ref, seed))
    train_idx = torch.as_tensor(select_subset(len(train_images), n, seed + 1))
    sets = {
        "generated": as_images(generated_images[:n]),
        "reference": as_images(reference_images[ref_idx]),
        "train": as_images(train_images[train_idx]),
    }
    feats, probs = {}, {}
    for name, images in sets.items():
        feats[name], probs[name] = predict(classifier, images, batch_size)
    options = dict(
        kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, pr_k=pr_k, dc_k=dc_k, seed=seed
    )
    gen_row = quality_metrics(
        feats["generated"], probs["generated"], feats["reference"], probs["reference"], **options
    )
    ref_row = quality_metrics(
        feats["train"], probs["train"], feats["reference"], probs["reference"], **options
    )
    # Both rows compare n features with n_ref: one plan, the one the figures were computed with.
    kid_plan = kid_subset_plan(n, n_ref, kid_subsets, kid_subset_size)
    report: dict[str, float | int | str] = {f"sq_{k}": v for k, v in gen_row.items()}
    report.update({f"sq_ref_{k}": v for k, v in ref_row.items()})
    report.update(
        {
            "sq_num_samples": n,
            "sq_num_reference": n_ref,
            "sq_feature_space": FEATURE_SPACE,
            "sq_rows": "sq_*: generated samples vs test images; sq_ref_*: training images vs test "
            "images (the real-versus-real reference), at the same sample sizes",
            "sq_kid_subsets": kid_plan[0],
            "sq_kid_subset_size": kid_plan[1],
            "sq_kid_estimator": f"KID: mean and std over {kid_plan[0]} subset(s) of "
            f"{kid_plan[1]} features of each set (without replacement within a subset, drawn "
            f"independently across subsets, seed {seed}); unbiased MMD^2, kernel (x.y/d + 1)^3",
            "sq_precision_recall_k": pr_k,
            "sq_density_coverage_k": dc_k,
        }
    )
    return report
