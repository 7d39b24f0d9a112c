"""What one pipeline run shows in MLflow: figures as metrics, grouped by section, and a
description that says what each figure is.

Settings are params (logged once from params.yaml); figures are metrics, each logged once,
under a prefix the MLflow charts group by: `val/` and `test/` (what people compare), `holdout/`
(what the promotion gate decided on), `sample_quality/`, `train/` (per epoch and totals),
`schedule/` (the learning rate and KL weight the schedule gave each epoch) and `time/` (speed
and time spent). Counts and settings that explain a figure (k, the subset, the data variant, the
estimator) are not metrics: they go into the run's description, a Markdown table the UI renders.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: Trainer history key -> MLflow metric key, logged with step = epoch.
EPOCH_METRICS = {
    "train_neg_elbo": "train/neg_elbo",
    "val_neg_elbo": "val/neg_elbo",
    "val_neg_iwae": "val/neg_iwae",  # iwae objective only: what chooses its weights
    "val_recon": "val/recon",
    "val_kl": "val/kl",
    "samples_per_second": "time/train_images_per_second",
    "epoch_seconds": "time/epoch_seconds",
    "lr": "schedule/lr",
    "beta": "schedule/kl_weight",
}
#: The objective actually minimised; logged only when it is not the -ELBO already logged.
#: (lr and beta likewise only when they change from epoch to epoch: `repeated_epoch_keys`.)
EPOCH_OBJECTIVE = ("train_loss", "train/loss")

#: Training totals -> MLflow metric key.
TRAIN_FIGURES = {
    "best_val_neg_elbo": "val/best_neg_elbo",
    "best_val_neg_iwae": "val/best_neg_iwae",
    "best_epoch": "train/best_epoch",
    "epochs": "train/epochs",
    "train_samples_per_second": "time/mean_train_images_per_second",
    "resumed_from_epoch": "train/resumed_from_epoch",
}

#: Training outcomes that are yes/no: tags `train.<flag>`, not metrics.
STOP_FLAGS = ("stopped_early", "stopped_by_time")

#: Evaluation figures (evaluate_model's keys) -> MLflow metric key. Sample quality follows a
#: rule instead (`sq_x` -> `sample_quality/x`), see `evaluation_figures`.
EVAL_FIGURES = {
    "test_nll_iwae": "test/nll_iwae",
    "test_nll_iwae_stderr": "test/nll_iwae_stderr",
    "test_nll_iwae_bits_per_dim": "test/nll_iwae_bits_per_dim",
    "test_neg_iwae_bce_greylevels": "test/neg_iwae_bce_greylevels",
    "test_neg_iwae_bce_greylevels_stderr": "test/neg_iwae_bce_greylevels_stderr",
    "test_neg_elbo": "test/neg_elbo",
    "test_recon": "test/recon",
    "test_kl": "test/kl",
    "test_bits_per_dim": "test/bits_per_dim",
    "active_units": "test/active_units",
    "holdout_nll_iwae": "holdout/nll_iwae",
    "holdout_neg_iwae_bce_greylevels": "holdout/neg_iwae_bce_greylevels",
    "eval_seconds": "time/eval_seconds",
    "iwae_seconds": "time/iwae_seconds",
}
#: sq_* numbers that are settings or counts of the sample-quality report, not figures.
SQ_NOT_FIGURES = {
    "sq_num_samples",
    "sq_num_reference",
    "sq_kid_subsets",
    "sq_kid_subset_size",
    "sq_precision_recall_k",
    "sq_density_coverage_k",
}
#: The per-digit label histogram stays in evaluation/metrics.json; its summary is label_tv.
SQ_LABEL_FRACTION = re.compile(r"^sq_(ref_)?label_frac_\d$")

#: The figures a person looks at first: the Prefect summary, the version description and the
#: version's `metric.*` tags show these.
HEADLINE = ("test/nll_iwae", "test/neg_elbo", "val/best_neg_elbo", "holdout/nll_iwae")


def headline(figures: Mapping[str, float]) -> dict[str, float]:
    """The HEADLINE figures a run has, in HEADLINE's order."""
    return {k: figures[k] for k in HEADLINE if k in figures}


def stop_tags(train_metrics: Mapping[str, Any]) -> dict[str, str]:
    """Training's yes/no outcomes as tags `train.<flag>` ("true"/"false")."""
    return {f"train.{k}": str(bool(train_metrics[k])).lower() for k in STOP_FLAGS}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_sample_quality_figure(key: str) -> bool:
    return key.startswith("sq_") and key not in SQ_NOT_FIGURES and not SQ_LABEL_FRACTION.match(key)


def epoch_figures(
    record: Mapping[str, Any], skip: frozenset[str] = frozenset()
) -> dict[str, float]:
    """One epoch's figures under their MLflow keys (the caller logs them at step = epoch),
    leaving out the history keys in `skip` (see `repeated_epoch_keys`)."""
    names = EPOCH_METRICS | {EPOCH_OBJECTIVE[0]: EPOCH_OBJECTIVE[1]}
    return {names[k]: float(v) for k, v in record.items() if k in names and k not in skip}


def training_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Training totals under their MLflow keys."""
    return {TRAIN_FIGURES[k]: float(v) for k, v in metrics.items() if k in TRAIN_FIGURES}


def figure_name(key: str) -> str:
    """The MLflow metric key of one of evaluate_model's figures (test_nll_iwae ->
    test/nll_iwae, sq_fd -> sample_quality/fd)."""
    if key in EVAL_FIGURES:
        return EVAL_FIGURES[key]
    if is_sample_quality_figure(key):
        return f"sample_quality/{key.removeprefix('sq_')}"
    raise KeyError(f"{key}: not a figure of evaluate_model")


def evaluation_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """evaluate_model's figures under their MLflow keys; its settings, counts and labels are
    left out (they are params, or explained in the description)."""
    return {
        figure_name(key): float(value)
        for key, value in metrics.items()
        if _number(value) and (key in EVAL_FIGURES or is_sample_quality_figure(key))
    }


def repeated_epoch_keys(train: Any) -> frozenset[str]:
    """Trainer history keys that would only repeat something logged already: the loss when it
    is the -ELBO itself (ELBO objective, beta 1, no warm-up), the learning rate when the
    schedule is constant and the KL weight without warm-up (then they are the settings
    train.lr and train.beta, which are params)."""
    skip = set()
    if train.objective == "elbo" and train.beta == 1.0 and train.warmup_epochs == 0:
        skip.add(EPOCH_OBJECTIVE[0])
    if train.lr_schedule == "constant":
        skip.add("lr")
    if train.warmup_epochs == 0:
        skip.add("beta")
    return frozenset(skip)


def _source(figure: str) -> str:
    """evaluate_model's key for an MLflow figure key (test/nll_iwae -> test_nll_iwae)."""
    return figure.replace("/", "_")


def _row(figure: str, value: float | None, what: str) -> str:
    shown = "" if value is None else f"{value:.4g}"
    return f"| `{figure}` | {shown} | {what} |"


def description(
    train_metrics: Mapping[str, Any], eval_metrics: Mapping[str, Any], figures: Mapping[str, float]
) -> str:
    """The run's description (MLflow renders it as Markdown): what every figure is."""
    m = eval_metrics
    variant = m.get("data_variant_label", m.get("data_variant", "?"))
    kind = m.get("likelihood_kind_label", "")
    is_nll = "test/nll_iwae" in figures
    iwae_name = "test/nll_iwae" if is_nll else "test/neg_iwae_bce_greylevels"
    holdout_name = "holdout/nll_iwae" if is_nll else "holdout/neg_iwae_bce_greylevels"
    best_epoch = (
        f"the best epoch ({train_metrics.get('best_epoch')} of {train_metrics.get('epochs')})"
    )
    chooses = "; chooses the weights (early stopping)"
    by_iwae = "val/best_neg_iwae" in figures  # the iwae objective: its bound chooses
    validation_rows = [
        _row(
            "val/best_neg_elbo",
            figures.get("val/best_neg_elbo"),
            f"-ELBO on the validation split at {best_epoch}" + ("" if by_iwae else chooses),
        )
    ]
    if by_iwae:
        validation_rows.append(
            _row(
                "val/best_neg_iwae",
                figures.get("val/best_neg_iwae"),
                "-IWAE bound with train.iwae_k samples (the training objective) on the "
                f"validation split at {best_epoch}{chooses}",
            )
        )
    rows = [
        *validation_rows,
        _row(iwae_name, figures.get(iwae_name), str(m.get(_source(iwae_name) + "_estimator", ""))),
        _row("test/neg_elbo", figures.get("test/neg_elbo"), str(m.get("test_neg_elbo_estimator"))),
        _row(
            "test/recon, test/kl",
            None,
            "the two terms of test/neg_elbo: -E_q log p(x|z) and KL(q(z|x) || N(0, I))",
        ),
        _row(holdout_name, figures.get(holdout_name), str(m.get("holdout_estimator", ""))),
        _row(
            "test/active_units",
            figures.get("test/active_units"),
            f"{m.get('active_units_estimator', '')}; of {m.get('latent_dim', '?')} latent units",
        ),
    ]
    if "sample_quality/fd" in figures:
        rows.append(
            _row(
                "sample_quality/*",
                None,
                f"{m.get('sq_num_samples')} generated images ({m.get('sq_generated', '')}) in the "
                f"feature space of the {m.get('sq_feature_space', '')}; fd: Frechet distance, "
                f"kid: {m.get('sq_kid_estimator', '')}; ref_*: {m.get('sq_rows', '')}",
            )
        )
    else:
        rows.append(_row("sample_quality/*", None, str(m.get("sq_status", "not measured"))))
    return "\n".join(
        [
            "## What the figures are",
            "",
            f"Data: {variant}. {kind}.",
            "",
            "| figure | value | what it is |",
            "| --- | --- | --- |",
            *rows,
            "",
            "Per-epoch curves: `train/neg_elbo`, `val/neg_elbo` (fixed binarization and noise, so "
            "epochs compare), `schedule/lr`, `schedule/kl_weight`. Images: `samples` (a fixed "
            "set of z) and `reconstructions` (fixed validation images) every few epochs.",
        ]
    )
