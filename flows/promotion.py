"""The promotion step of the pipeline: score challenger and champion on the same frozen test
examples in this process, decide with the gate, and record the decision on the version."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from flows.model_io import load_vae_with_config
from flows.registry import apply_gate, champion_version, compare_on_same_data, evaluate_gate


def gate_and_apply(name: str, version: str, processed_dir: Path, params: dict) -> dict:
    """Run the gate for `name` version `version` under params['promote']; returns the outcome.

    The test examples are the evaluation's seeded IWAE subset (evaluate.iwae_test_size and
    evaluate.seed), and each example's importance samples are seeded by its index, so both
    models see the same data and the same noise: the paired difference is the models'.
    """
    from vae_core.data import load_processed
    from vae_core.evaluation.likelihood import iwae_log_likelihood, select_subset
    from vae_core.training.run import test_inputs

    client = MlflowClient()
    gate, ev = params["promote"], params["evaluate"]
    mode = gate["mode"]
    if mode == "disabled":
        apply_gate(client, name, version, None, mode)
        return {"decision": "not-evaluated", "reason": "promotion gate disabled", "applied": False}

    splits = load_processed(processed_dir)
    x_all = test_inputs(splits, params["train"]["data_variant"])
    indices = select_subset(len(x_all), ev["iwae_test_size"], ev["seed"])
    x = x_all[indices]
    challenger_uri = f"models:/{name}/{version}"
    champion = champion_version(name, client=client)
    if champion is not None and champion != version:
        challenger_nll, champion_nll = compare_on_same_data(
            challenger_uri,
            f"models:/{name}/{champion}",
            x,
            ev["iwae_k"],
            ev["seed"],
            indices=indices,
        )
    else:
        model, _ = load_vae_with_config(challenger_uri)
        challenger_nll = -iwae_log_likelihood(
            model, x, ev["iwae_k"], seed=ev["seed"], indices=indices
        )
        champion_nll = None
    decision = evaluate_gate(
        challenger_nll,
        champion_nll,
        floor_nll=gate["floor_nll"],
        margin_nats=gate["margin_nats"],
        bootstrap_samples=gate["bootstrap_samples"],
        confidence=gate["confidence"],
        seed=ev["seed"],
    )
    applied = apply_gate(client, name, version, decision, mode)
    return {
        "decision": decision.label,
        "reason": decision.reason,
        "applied": applied,
        "champion_before": champion,
        "figures": decision.figures,
    }
