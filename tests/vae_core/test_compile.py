"""`train.compile: true`: the training loss compiles as one graph with no break (eps is drawn
outside `training_loss`), for each model family and both objectives; a compiled run gives the
eager run's figures. The trainer runs on the `aot_eager` backend (Dynamo and AOTAutograd as in
a real run, without Inductor's C++ builds: 60-90 s cold on a busy two-core machine)."""

from dataclasses import replace

import pytest
import torch
from helpers import TWO_LAYER
from torch._dynamo.utils import counters

from vae_core.config import VAEConfig
from vae_core.models.factory import build_vae
from vae_core.objectives import training_loss
from vae_core.training import TrainConfig, Trainer

#: One small model of each family (the graph does not depend on the widths): the default
#: ReLU MLP, Burda's one-layer tanh MLP with two hidden layers, and his two-layer model.
MODELS = {
    "default": VAEConfig(hidden_sizes=(32,), latent_dim=4),
    "burda-1-layer": VAEConfig(hidden_sizes=(16, 16), latent_dim=6, activation="tanh"),
    "burda-2-layer": TWO_LAYER,
}
BATCH, K = 8, 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """No compiled code, guards or counters carried in from (or out to) another test."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


# beta < 1 (KL warm-up) takes the IWAE objective down its other branch: the tempered bound.
@pytest.mark.parametrize(("objective", "beta"), [("elbo", 1.0), ("iwae", 1.0), ("iwae", 0.5)])
@pytest.mark.parametrize("name", list(MODELS))
def test_training_loss_traces_as_one_graph_without_breaks(name, objective, beta):
    model = build_vae(MODELS[name], seed=0).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.rand(BATCH, 1, 28, 28, generator=gen), generator=gen)
    shape = (BATCH, model.noise_dim) if objective == "elbo" else (BATCH, K, model.noise_dim)
    eps = torch.randn(shape, generator=gen)

    explained = torch._dynamo.explain(training_loss)(model, x, eps, beta, objective)

    reasons = [str(r.reason) for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1, reasons
    # Dynamo's own counters as well: explain does not count a break before the first traced
    # op (a `randn(..., generator=g)` at the top of the loss), which leaves a resume frame.
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["frames"]["total"] == 1 and not counters["resumes"]
    # The graph holds the model: its parameters feed the loss (not an empty, guarded shell).
    assert explained.op_count > 10
    # Explaining ran the function: the figures are the eager ones.
    loss, bound = training_loss(model, x, eps, beta, objective)
    assert torch.isfinite(loss) and bound.shape == (BATCH,)


def _images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=gen, dtype=torch.uint8)


def _fit(compile_: bool, objective: str) -> tuple[list[dict], dict[str, torch.Tensor]]:
    config = TrainConfig(epochs=3, batch_size=64, lr=1e-3, patience=0, device="cpu", seed=0)
    k = 2 if objective == "iwae" else 1
    # A KL warm-up over two epochs: weights 0, 0.5, then 1.
    config = replace(config, compile=compile_, objective=objective, iwae_k=k, warmup_epochs=2)
    model = build_vae(VAEConfig(hidden_sizes=(64,), latent_dim=8), seed=0)
    trainer = Trainer(model, config, progress=False)
    # 160 images in batches of 64: the last batch (32) is another shape, as in real data.
    # (It runs eager; a graph for it would be another compilation, 20-60 s on CUDA.)
    with torch.compiler.set_stance("default", force_backend="aot_eager"):
        result = trainer.fit(_images(160, 0), _images(48, 1))
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return result.history, weights


@pytest.mark.parametrize("objective", ["elbo", "iwae"])
def test_compiled_trainer_matches_the_eager_trainer(objective):
    eager_history, eager_weights = _fit(False, objective)
    assert not counters["frames"], "the eager run compiled something"

    compiled_history, compiled_weights = _fit(True, objective)

    # The loss really went through Dynamo and AOTAutograd, whole, with no eager fallback.
    assert counters["frames"]["total"] >= 1
    assert counters["frames"]["ok"] == counters["frames"]["total"]
    assert counters["aot_autograd"]["ok"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])
    # One graph for every KL weight (0 included) and both batch shapes: nothing recompiled.
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["recompiles"], dict(counters["recompiles"])

    assert [h["beta"] for h in compiled_history] == [h["beta"] for h in eager_history]
    assert [h["beta"] for h in eager_history] == [0.0, 0.5, 1.0]
    for epoch, (compiled, eager) in enumerate(zip(compiled_history, eager_history, strict=True)):
        for key in ("train_loss", "train_neg_elbo", "val_neg_elbo", "val_kl"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5), (epoch, key)
    # A step was taken (the weights moved from their seeded start), the same step both ways.
    start = build_vae(VAEConfig(hidden_sizes=(64,), latent_dim=8), seed=0).state_dict()
    assert any(not torch.equal(eager_weights[k], start[k]) for k in start)
    for key, value in eager_weights.items():
        torch.testing.assert_close(compiled_weights[key], value, rtol=1e-4, atol=1e-5)
