"""What one pipeline run shows in MLflow: figures as metrics, grouped by section, and a
description that says what each figure is.

Settings are params (logged once from params.yaml); figures are metrics, each logged once,
under a prefix the MLflow charts group by: `val/` and `test/` (what people compare), `holdout/`
(what the promotion gate decided on), `sample_quality/`, `train/` (per epoch and totals),
`schedule/` (the learning rate and KL weight the schedule gave each epoch) and `time/` (speed
and time spent). Counts and settings that explain a figure (k, the subset, the data variant, the
estimator) are not metrics: they go into the run's description, a Markdown table the UI renders.

Each figure has one name, its MLflow metric name: vae_core.figure_names maps the trainer's keys
to it once (the experiments log training through it too, without this package), the tables
below the evaluation's, and everything downstream (the logged model's metrics, the registry's
tags, the sweep's table and winner) uses that name only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: The one table of evaluation names: evaluate_model's key -> the figure's MLflow metric name.
#: From here on (the run, the model's metrics, the registry, the sweep) a figure is known only by
#: its MLflow name. A numeric key of evaluate_model that is neither here nor in NOT_FIGURES is
#: an error (`evaluation_figures`), so a new figure cannot be dropped without a word.
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
    # Sample quality: generated images against the test images (sq_x), and the real-versus-
    # real reference row (sq_ref_x, training images against test images) beside it.
    **{
        f"sq_{row}{name}": f"sample_quality/{row}{name}"
        for row in ("", "ref_")
        for name in (
            "fd",
            "kid",
            "kid_std",
            "precision",
            "recall",
            "density",
            "coverage",
            "inception_score",
            "inception_score_std",
            "label_tv",
        )
    },
}
#: Numbers evaluate_model returns that are settings, counts or labels, not figures: they explain
#: a figure (the run's description and evaluation/metrics.json carry them), never a metric.
NOT_FIGURES = frozenset(
    {
        "test_size",
        "seed",
        "iwae_k",
        "iwae_test_size",
        "iwae_num_examples",
        "holdout_num_examples",
        "active_units_threshold",
        "latent_dim",
        "sq_num_samples",
        "sq_num_reference",
        "sq_kid_subsets",
        "sq_kid_subset_size",
        "sq_precision_recall_k",
        "sq_density_coverage_k",
    }
)
#: The per-digit label histogram stays in evaluation/metrics.json; its summary is label_tv.
SQ_LABEL_FRACTION = re.compile(r"^sq_(ref_)?label_frac_\d$")
#: The split each evaluation section was measured on (time/ was measured on none): the MLflow
#: dataset an evaluation figure is linked to.
SECTION_SPLITS = {"test": "test", "sample_quality": "test", "holdout": "holdout"}

#: The figures a person looks at first: the Prefect summary, the version description and the
#: version's `metric.*` tags show these.
HEADLINE = ("test/nll_iwae", "test/neg_elbo", "val/best_neg_elbo", "holdout/nll_iwae")


def headline(figures: Mapping[str, float]) -> dict[str, float]:
    """The HEADLINE figures a run has, in HEADLINE's order."""
    return {k: figures[k] for k in HEADLINE if k in figures}


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class UnnamedFigureError(LookupError):
    """evaluate_model returned a number that run_record does not name: add it to EVAL_FIGURES
    (a figure) or NOT_FIGURES (a setting, a count)."""


def is_figure(key: str, value: Any) -> bool:
    """Whether one of evaluate_model's entries is a figure; UnnamedFigureError for a number
    that is neither a named figure nor a declared non-figure."""
    if not _number(value) or key in NOT_FIGURES or SQ_LABEL_FRACTION.match(key):
        return False
    if key not in EVAL_FIGURES:
        raise UnnamedFigureError(
            f"evaluate_model returned {key!r} = {value!r}, which has no MLflow name: add it to "
            "flows.run_record.EVAL_FIGURES if it is a figure, or to NOT_FIGURES if it is a "
            "setting or a count"
        )
    return True


def evaluation_figures(metrics: Mapping[str, Any]) -> dict[str, float]:
    """evaluate_model's figures under their MLflow names; its settings, counts and labels are
    left out (they are params, or explained in the description)."""
    return {EVAL_FIGURES[k]: float(v) for k, v in metrics.items() if is_figure(k, v)}


def evaluated_on(figure: str) -> str | None:
    """The split an evaluation figure was measured on (test/nll_iwae: test), or None."""
    return SECTION_SPLITS.get(figure.split("/", 1)[0])


def on_test_set(figure: str) -> bool:
    """Whether a figure was measured on the test set: reported, never chosen by."""
    return evaluated_on(figure) == "test"


#: MLflow name -> evaluate_model's key, to find a figure's label (its `_estimator` entry).
_EVAL_KEYS = {name: key for key, name in EVAL_FIGURES.items()}


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
    iwae_estimator = f"{_EVAL_KEYS[iwae_name]}_estimator"
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
        _row(iwae_name, figures.get(iwae_name), str(m.get(iwae_estimator, ""))),
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
