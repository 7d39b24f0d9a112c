"""CUDA paths: bf16 autocast with float32 reductions, fused Adam, exact resume, IWAE and the
two-layer network, IWAE k=5000 within a memory bound, a compiled loss, cuDNN flags. Torch only
(the GPU box has no mlflow, prefect or dvc), run by scripts/gpu_check.sh; skipped without CUDA."""

import numpy as np
import pytest
import torch
from helpers import TWO_LAYER
from torch._dynamo.utils import counters

from vae_core.evaluation.classifier import deterministic_cudnn
from vae_core.evaluation.likelihood import iwae_log_likelihood
from vae_core.models import build_vae
from vae_core.objectives import training_loss
from vae_core.training import TrainConfig, Trainer, load_checkpoint

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _digits(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 28, 28, generator=gen) * 255).to(torch.uint8)


def _trainer(**overrides) -> Trainer:
    config = TrainConfig(**({"epochs": 2, "device": "cuda", "patience": 0} | overrides))
    return Trainer(build_vae(seed=0), config, progress=False)


def test_cuda_training_uses_bf16_autocast_and_fused_adam(tmp_path):
    x = _digits(2048, 0)
    trainer = _trainer()
    assert trainer.optimizer.defaults["fused"] is True and trainer.skips_on_device
    result = trainer.fit(x, x[:256], tmp_path)
    assert trainer.device.type == "cuda" and result.device.startswith("cuda")
    assert all(np.isfinite(m["train_loss"]) for m in result.history)
    assert result.history[-1]["val_neg_elbo"] < result.history[0]["val_neg_elbo"] + 5


def test_one_plus_one_epochs_resumed_equal_two_epochs_bitwise(tmp_path):
    x, val = _digits(1000, 0), _digits(200, 1)
    straight = _trainer()
    straight.fit(x, val, tmp_path / "straight")
    _trainer(epochs=1).fit(x, val, tmp_path / "halves")
    assert load_checkpoint(tmp_path / "halves" / "last.pt")["epoch"] == 1
    resumed = _trainer()
    result = resumed.fit(x, val, tmp_path / "halves")
    assert result.resumed_from_epoch == 1 and not result.noise_reseeded
    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_under_autocast_the_latent_the_kl_and_the_log_weights_stay_float32():
    model = build_vae(seed=0).cuda()
    x = torch.rand(64, 1, 28, 28, device="cuda").round()
    seen = {}
    model.decoder.register_forward_pre_hook(lambda _, args: seen.setdefault("z", args[0].dtype))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        terms = model.elbo_terms(x, torch.randn(64, model.noise_dim, device="cuda"))
        log_px_z, log_prior_minus_q = model.log_weight_terms(
            x, torch.randn(64, 5, model.noise_dim, device="cuda")
        )
        loss, bound = training_loss(model, x, torch.randn(64, 5, model.noise_dim, device="cuda"),
                                    torch.tensor(0.5, device="cuda"), "iwae")  # fmt: skip
    wide = (torch.float32, torch.float64)
    assert seen["z"] in wide
    assert terms.kl.dtype in wide and terms.log_px_z.dtype in wide
    assert log_px_z.dtype in wide and log_prior_minus_q.dtype in wide
    assert loss.dtype in wide and bound.dtype in wide


@pytest.mark.parametrize("kind", ["iwae-k5", "two-layer"])
def test_one_epoch_of_the_iwae_objective_and_of_the_two_layer_network(tmp_path, kind):
    x = _digits(2000, 0)
    if kind == "iwae-k5":
        model, config = build_vae(seed=0), TrainConfig(objective="iwae", iwae_k=5)
    else:
        model, config = build_vae(TWO_LAYER, seed=0), TrainConfig()
    config = TrainConfig(**(config.to_dict() | {"epochs": 1, "device": "cuda", "patience": 0}))
    result = Trainer(model, config, progress=False).fit(x, x[:200], tmp_path)
    assert result.epochs_completed == 1 and np.isfinite(result.history[0]["val_neg_elbo"])
    if kind == "iwae-k5":
        assert np.isfinite(result.history[0]["val_neg_iwae"])


def test_iwae_5000_on_10000_images_with_the_default_chunking_fits_a_memory_bound():
    model = build_vae(seed=0).cuda().eval()
    x = torch.rand(10_000, 1, 28, 28, device="cuda").round()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    bound = iwae_log_likelihood(model, x, 5000, seed=0)
    peak_gib = (torch.cuda.max_memory_allocated() - before) / 2**30
    print(f"\niwae_k5000_10000_peak_gib {peak_gib:.2f}")
    assert bound.shape == (10_000,) and np.isfinite(bound).all()
    assert peak_gib < 16, peak_gib  # the chunks, not 10,000 x 5,000 decoded images (150 GiB)


def test_a_compiled_loss_serves_a_warm_up_and_a_short_last_batch_with_one_graph(tmp_path):
    torch._dynamo.reset()
    counters.clear()
    trainer = _trainer(epochs=3, warmup_epochs=2, batch_size=256, compile=True)
    result = trainer.fit(_digits(1000, 0), _digits(100, 1), tmp_path)  # last batch: 232
    assert [h["beta"] for h in result.history] == [0.0, 0.5, 1.0]
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_the_classifier_leaves_the_cudnn_flags_as_it_found_them():
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True
    try:
        with deterministic_cudnn(True):
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (False, True)
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
