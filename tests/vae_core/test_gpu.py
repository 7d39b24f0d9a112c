"""CUDA paths: bf16 autocast with logits-based losses, fused Adam, IWAE k=5000 in chunks.

Run by scripts/gpu_check.sh on a CUDA machine; on a CPU-only machine these are skipped
(and reported as skipped, not passed)."""

import numpy as np
import pytest
import torch

from vae_core.evaluation.likelihood import iwae_log_likelihood
from vae_core.models import build_vae
from vae_core.training import TrainConfig, Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_training_uses_bf16_autocast_and_fused_adam(tmp_path):
    x = (torch.rand(2048, 28, 28) * 255).to(torch.uint8)
    trainer = Trainer(build_vae(), TrainConfig(epochs=2, device="cuda"), progress=False)
    assert trainer.optimizer.defaults["fused"] is True
    result = trainer.fit(x, x[:256], tmp_path)
    assert trainer.device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(m["train_loss"])) for m in result.history)
    assert result.history[-1]["val_neg_elbo"] < result.history[0]["val_neg_elbo"] + 5


def test_iwae_5000_on_the_full_test_size_fits_in_chunks():
    model = build_vae().cuda().eval()
    x = torch.rand(10_000, 1, 28, 28, device="cuda").round()
    # 500 images at a time, their 5000 samples through the decoder 250 at a time.
    bound = iwae_log_likelihood(model, x[:2000], 5000, seed=0, batch_size=500, max_rows=125_000)
    assert bound.shape == (2000,) and np.isfinite(bound).all()
