"""Evaluation: likelihood figures, sample quality in a classifier's feature space, PNG figures,
and `evaluate_model`, the one entry point that writes them all into a folder."""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule. Loaded on first use (PEP 562), so `python -m vae_core.evaluation.report`
# and `... .classifier` do not import their own module twice through this package.
_EXPORTS = {
    "ClassifierConfig": "classifier",
    "MnistClassifier": "classifier",
    "load_classifier": "classifier",
    "predict": "classifier",
    "save_classifier": "classifier",
    "train_classifier": "classifier",
    "save_interpolation": "images",
    "save_latent_map": "images",
    "save_model_latent_map": "images",
    "save_reconstructions": "images",
    "save_sample_grid": "images",
    "ElboSummary": "likelihood",
    "IWAEResult": "likelihood",
    "active_units": "likelihood",
    "bits_per_dim": "likelihood",
    "elbo_summary": "likelihood",
    "iwae_log_likelihood": "likelihood",
    "iwae_nll": "likelihood",
    "select_subset": "likelihood",
    "evaluate_model": "report",
    "likelihood_kind": "report",
    "load_per_example": "report",
    "density_coverage": "sample_quality",
    "feature_statistics": "sample_quality",
    "frechet_distance": "sample_quality",
    "inception_score": "sample_quality",
    "kernel_inception_distance": "sample_quality",
    "label_histogram": "sample_quality",
    "precision_recall": "sample_quality",
    "quality_metrics": "sample_quality",
    "sample_quality_report": "sample_quality",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "ClassifierConfig",
    "ElboSummary",
    "IWAEResult",
    "MnistClassifier",
    "active_units",
    "bits_per_dim",
    "density_coverage",
    "elbo_summary",
    "evaluate_model",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "iwae_log_likelihood",
    "iwae_nll",
    "kernel_inception_distance",
    "label_histogram",
    "likelihood_kind",
    "load_classifier",
    "load_per_example",
    "precision_recall",
    "predict",
    "quality_metrics",
    "sample_quality_report",
    "save_classifier",
    "save_interpolation",
    "save_latent_map",
    "save_model_latent_map",
    "save_reconstructions",
    "save_sample_grid",
    "select_subset",
    "train_classifier",
]
