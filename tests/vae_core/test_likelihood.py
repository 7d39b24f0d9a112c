"""The likelihood estimators: a known-answer test on a linear-Gaussian model, IWAE >= ELBO on a
VAE, invariance of the per-example estimate to batching and subsets, active units, and the CPU
fast path of the IWAE evaluation against the generic path and a float64 reference."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import TWO_LAYER
from torch import nn

from vae_core.config import BURDA_ONE_LAYER, BURDA_TWO_LAYER
from vae_core.estimators import iwae_log_likelihood
from vae_core.evaluation import active_units, bits_per_dim, elbo_summary
from vae_core.evaluation.likelihood import iwae_nll, select_subset
from vae_core.models import build_vae
from vae_core.models.likelihoods import Scratch
from vae_core.models.vae import VAE, FoldedMLP, OneStochasticLayer, VAEConfig
from vae_core.objectives import dataset_elbo


class LinearGaussian(OneStochasticLayer):
    """z ~ N(0, I_d), x | z ~ N(W z + b, s^2 I_D): log p(x) = log N(x | b, W W^T + s^2 I) exactly.
    q(z|x): the exact posterior mean, the marginal variances times `inflate` (exact when W^T W
    is diagonal and inflate is 1). The library's one-layer bounds run on it as on the VAE."""

    def __init__(self, W: torch.Tensor, b: torch.Tensor, sigma: float, inflate: float = 1.0):
        super().__init__()
        W = W.double()
        self.W = nn.Parameter(W, requires_grad=False)
        self.b = nn.Parameter(b.double(), requires_grad=False)
        self.sigma = sigma
        d = self.latent_dim = W.shape[1]
        post_cov = torch.linalg.inv(torch.eye(d, dtype=torch.float64) + W.T @ W / sigma**2)
        self.register_buffer("gain", post_cov @ W.T / sigma**2)  # mean = gain (x - b)
        self.register_buffer("logvar", torch.log(post_cov.diagonal() * inflate))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.double()
        mu = (x - self.b) @ self.gain.T
        return mu, self.logvar.expand_as(mu)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z.double() @ self.W.T + self.b

    def log_likelihood(self, x: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        return torch.distributions.Normal(mean, self.sigma).log_prob(x.double()).sum(1)

    def exact_log_px(self, x: torch.Tensor) -> torch.Tensor:
        cov = self.W @ self.W.T + self.sigma**2 * torch.eye(len(self.b), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x.double())


def _data(model: LinearGaussian, n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, model.W.shape[1], generator=gen, dtype=torch.float64)
    noise = torch.randn(n, len(model.b), generator=gen, dtype=torch.float64)
    return z @ model.W.T + model.b + model.sigma * noise


def test_iwae_is_exact_when_q_is_the_true_posterior():
    # Orthogonal columns make the posterior covariance diagonal: every weight equals p(x).
    q, _ = torch.linalg.qr(torch.randn(6, 3, generator=torch.Generator().manual_seed(0)))
    model = LinearGaussian(q * torch.tensor([2.0, 1.0, 0.5]), torch.linspace(-1, 1, 6), 0.7)
    x = _data(model, 50, seed=1)
    exact = model.exact_log_px(x).numpy()
    for k in (1, 7):
        np.testing.assert_allclose(iwae_log_likelihood(model, x, k, seed=3), exact, atol=1e-6)


def test_iwae_converges_to_exact_log_likelihood_from_below():
    # Strongly correlated latents: the diagonal q (variance doubled) misses the posterior.
    gen = torch.Generator().manual_seed(2)
    W = torch.randn(5, 2, generator=gen)
    W[:, 1] = W[:, 0] + 0.3 * torch.randn(5, generator=gen)
    model = LinearGaussian(W, torch.randn(5, generator=gen), 0.5, inflate=2.0)
    x = _data(model, 1000, seed=4)
    exact = float(model.exact_log_px(x).mean())
    gaps = [
        exact - float(iwae_log_likelihood(model, x, k, seed=5).mean()) for k in (1, 10, 100, 1000)
    ]
    assert gaps[0] > 0.5, f"q should be a visibly imperfect posterior, gaps {gaps}"
    assert all(a > b for a, b in zip(gaps, gaps[1:], strict=False)), f"not tightening: {gaps}"
    # Below the exact value up to Monte Carlo noise (about 0.001 nats at k=1000 here).
    assert all(g > -0.003 for g in gaps), f"IWAE above the exact log p(x): {gaps}"
    assert gaps[-1] < 0.005, f"k=1000 still {gaps[-1]:.4f} nats from exact"


def _vae(seed: int = 0) -> VAE:
    return build_vae(VAEConfig(hidden_sizes=[64], latent_dim=4), seed=seed).eval()


def _binary_images(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.rand(1, 1, 28, 28, generator=gen).expand(n, 1, 28, 28)
    return torch.bernoulli(probs, generator=gen)


@pytest.mark.parametrize("config", [VAEConfig(hidden_sizes=[64], latent_dim=4), TWO_LAYER])
def test_iwae_is_above_the_elbo_and_tightens_with_k(config):
    model, x = build_vae(config, seed=0).eval(), _binary_images(200, seed=0)
    elbo = dataset_elbo(model, x, generator=torch.Generator().manual_seed(2)).elbo.double()
    one = iwae_log_likelihood(model, x, 1, seed=2)
    # k=1 is the ELBO with a Monte Carlo KL in place of the analytic one: equal in expectation,
    # per example (within 3 standard errors) and as elbo_summary reports it.
    diff = one - elbo.numpy()
    assert abs(diff.mean()) < 3 * diff.std(ddof=1) / len(diff) ** 0.5
    assert abs(-one.mean() - elbo_summary(model, x, seed=0).neg_elbo) < 2.0
    bounds = {k: iwae_log_likelihood(model, x, k, seed=5) for k in (1, 10, 100)}
    assert bounds[1].mean() < bounds[10].mean() < bounds[100].mean()
    assert bounds[100].mean() - elbo.mean().item() > 1.0  # an untrained model leaves a gap
    # Per example the k=100 bound is higher on average, by many standard errors.
    gain = bounds[100] - bounds[1]
    assert gain.mean() > 5 * gain.std(ddof=1) / math.sqrt(len(gain))
    # Independent noise (another seed) gives the same figure up to Monte Carlo error.
    assert abs(iwae_log_likelihood(model, x, 100, seed=9).mean() - bounds[100].mean()) < 1.0
    assert bits_per_dim(784 * math.log(2.0)) == pytest.approx(1.0)  # nats per image to bits
    assert elbo_summary(model, x[:10]).bits_per_dim > 0


#: Batching, chunking and threads change only the order of float32 operations, never the
#: estimator or its noise. A figure is a sum over 784 pixels of log-probabilities of one sign,
#: each good to a few float32 roundings (u = 2**-24) of its size, so 16 roundings of the sum's
#: magnitude bound the change with room: 1e-6 relative, 5e-4 of the -546 nats here (measured:
#: 1.2e-8). A real fault, noise given to the wrong example, moves a figure by nats (`other_seed`).
FLOAT32_RTOL = 16 * 2.0**-24


def test_estimate_does_not_depend_on_batching_chunking_threads_or_subset():
    model, x = _vae(), _binary_images(23, seed=5)
    whole = iwae_log_likelihood(model, x, 70, seed=7)
    assert whole.dtype == np.float64 and model.iwae_scorer(64) is not None  # the fast path
    for batch_size, max_rows in [(4, 24), (1, 1000), (23, 70 * 23), (5, 7)]:
        chunked = iwae_log_likelihood(
            model, x, 70, seed=7, batch_size=batch_size, max_rows=max_rows
        )
        np.testing.assert_allclose(chunked, whole, rtol=FLOAT32_RTOL, atol=0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one_thread = iwae_log_likelihood(model, x, 70, seed=7)
    finally:
        torch.set_num_threads(threads)
    assert torch.get_num_threads() == threads  # the workers' setting does not leak
    np.testing.assert_allclose(one_thread, whole, rtol=FLOAT32_RTOL, atol=0)
    # The generic path chunks alike (its float32 sums differ from the fast path's: see below).
    generic = iwae_log_likelihood(model, x, 70, seed=7, fast=False)
    chunked = iwae_log_likelihood(model, x, 70, seed=7, fast=False, batch_size=4, max_rows=24)
    np.testing.assert_allclose(chunked, generic, rtol=FLOAT32_RTOL, atol=0)
    result = iwae_nll(model, x, 70, test_size=9, seed=7)
    np.testing.assert_allclose(result.nll, -whole[result.indices], rtol=FLOAT32_RTOL, atol=0)
    assert result.nll.dtype == np.float64 and result.indices.dtype == np.int64
    np.testing.assert_array_equal(iwae_nll(model, x, 70, test_size=9, seed=7).nll, result.nll)
    other_seed = iwae_log_likelihood(model, x, 70, seed=8)
    assert np.abs(other_seed - whole).max() > 100 * FLOAT32_RTOL * np.abs(whole).max()


def test_select_subset_is_seeded_sorted_and_zero_means_all():
    a = select_subset(1000, 100, seed=3)
    np.testing.assert_array_equal(a, select_subset(1000, 100, seed=3))
    assert len(np.unique(a)) == 100 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, select_subset(1000, 100, seed=4))
    np.testing.assert_array_equal(select_subset(50, 0, seed=3), np.arange(50))
    np.testing.assert_array_equal(select_subset(50, 80, seed=3), np.arange(50))
    with pytest.raises(ValueError, match="iwae_test_size"):
        select_subset(50, -1, seed=0)
    with pytest.raises(ValueError, match="iwae_k"):
        iwae_log_likelihood(_vae(), _binary_images(2, 0), 0)


class ControlledEncoder(nn.Module):
    """mu_u = scale_u * x_u: unit u's posterior mean varies over x with variance scale_u^2."""

    def __init__(self, scales: list[float]):
        super().__init__()
        self.scales = nn.Parameter(torch.tensor(scales), requires_grad=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = x[:, : len(self.scales)] * self.scales
        return mu, torch.zeros_like(mu)


def test_active_units_counts_units_whose_mean_moves_with_x():
    x = torch.randn(5000, 8, generator=torch.Generator().manual_seed(0))
    # Variances 1, 0.25, 0.0225 (active) and 0.0025, 0 (collapsed).
    count, variances = active_units(ControlledEncoder([1.0, 0.5, 0.15, 0.05, 0.0]), x)
    assert count == 3
    np.testing.assert_allclose(variances, [1.0, 0.25, 0.0225, 0.0025, 0.0], rtol=0.08, atol=1e-9)


def _float64_iwae(model: nn.Module, x: torch.Tensor, k: int, seed: int) -> np.ndarray:
    """The same estimator with the same noise, every step in float64: the generic path on a
    float64 copy of the model whose Bernoulli log-probability is summed in float64 too."""
    m = copy.deepcopy(model).double()

    def log_likelihood(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        bce = F.binary_cross_entropy_with_logits(logits.double(), x.double(), reduction="none")
        return -bce.flatten(1).sum(1)

    m.log_likelihood = log_likelihood
    return iwae_log_likelihood(m, x.double(), k, seed=seed, fast=False)


@pytest.mark.parametrize(
    "config",
    [VAEConfig(), BURDA_ONE_LAYER, BURDA_TWO_LAYER],
    ids=["mlp_784_400_20", "burda_one_layer", "burda_two_layer"],
)
def test_fast_path_equals_the_generic_path_and_a_float64_reference(config):
    model, x = build_vae(config, seed=0).eval(), _binary_images(12, seed=3)
    assert model.iwae_scorer(64) is not None  # these models take the fast path on the CPU
    fast = iwae_log_likelihood(model, x, 40, seed=1)
    generic = iwae_log_likelihood(model, x, 40, seed=1, fast=False)
    exact = _float64_iwae(model, x, 40, seed=1)
    # The generic path sums 784 float32 terms per sample; the fast path's sums are float64.
    np.testing.assert_allclose(fast, generic, rtol=0, atol=2e-4)
    np.testing.assert_allclose(fast, exact, rtol=0, atol=1e-4)
    assert np.abs(fast - exact).max() <= np.abs(generic - exact).max() + 2e-5
    # Exact too with the large logits of a trained decoder on MNIST's background (+-10..40:
    # the last layer of p(x|z) times 30), where x . l and sum |l| nearly cancel: far below the
    # 0.01 nats that would matter; what is left is the float32 matrix products' error.
    last = model.p_x[-1] if hasattr(model, "p_x") else model.decoder.net[-1]
    with torch.no_grad():
        last.weight.mul_(30.0), last.bias.mul_(30.0)
    x = _binary_images(8, seed=4)
    fast = iwae_log_likelihood(model, x, 30, seed=2)
    assert fast.mean() < -1000
    np.testing.assert_allclose(fast, _float64_iwae(model, x, 30, seed=2), rtol=0, atol=1e-3)


@pytest.mark.parametrize(
    "config", [VAEConfig(), BURDA_TWO_LAYER], ids=["mlp_784_400_20", "burda_two_layer"]
)
def test_bf16_matrix_products_keep_the_estimate_within_hundredths_of_a_nat(config):
    # The bf16 fast path: the decoder's products in bf16, |l|, sigmoid, logs and sums as in
    # float32/float64. The same importance samples, so image by image against fp32; and the
    # generic path under bf16 autocast (other roundings) agrees with it. (A trained model on
    # all 10,000 test images: `python3 -m experiments eval-bench --precisions fp32,bf16 --full`.)
    model, x = build_vae(config, seed=0).eval(), _binary_images(16, seed=5)
    fp32 = iwae_log_likelihood(model, x, 50, seed=1)
    bf16 = iwae_log_likelihood(model, x, 50, seed=1, precision="bf16")
    autocast = iwae_log_likelihood(model, x, 50, seed=1, precision="bf16", fast=False)
    assert not np.array_equal(bf16, fp32)  # the products did run in bf16
    assert abs((bf16 - fp32).mean()) < 0.01 and np.abs(bf16 - fp32).max() < 0.1
    np.testing.assert_allclose(bf16, autocast, rtol=0, atol=0.1)
    with pytest.raises(ValueError, match="precision: expected fp32 or bf16, found 'fp16'"):
        iwae_log_likelihood(model, x, 5, precision="fp16")


def test_fast_path_on_grey_levels_and_flat_images_and_the_models_without_one():
    # Bernoulli on grey levels is the summed binary cross-entropy: same formula, x in [0, 1].
    model = build_vae(BURDA_ONE_LAYER, seed=1).eval()
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    fast = iwae_log_likelihood(model, x, 25, seed=0)
    np.testing.assert_allclose(fast, _float64_iwae(model, x, 25, seed=0), rtol=0, atol=1e-4)
    flat = iwae_log_likelihood(model, x.flatten(1), 25, seed=0)
    np.testing.assert_allclose(flat, fast, rtol=FLOAT32_RTOL, atol=0)
    # Models without a fast path keep the generic one.
    assert build_vae(VAEConfig(architecture="conv"), seed=0).iwae_scorer(64) is None
    cb = VAEConfig(likelihood="continuous_bernoulli")
    assert build_vae(cb, seed=0).iwae_scorer(64) is None
    assert build_vae(VAEConfig(), seed=0).double().iwae_scorer(64) is None
    gauss = LinearGaussian(torch.eye(3)[:, :2], torch.zeros(3), 0.5)
    assert gauss.iwae_scorer(64) is None  # the exact tests above ran the generic path


def test_tanh_folded_into_sigmoids_is_the_same_network():
    torch.manual_seed(0)
    net = build_vae(BURDA_TWO_LAYER, seed=0).p_z1  # Linear, tanh, Linear, tanh, Linear
    folded = FoldedMLP.from_module(net)
    u = torch.randn(50, 50)
    with torch.inference_mode():
        mu, logvar = net(u)
        out = folded(u, Scratch(50), "t")
    torch.testing.assert_close(out, torch.cat([mu, logvar], 1), rtol=0, atol=1e-5)
    assert FoldedMLP.from_module(nn.Sequential(nn.Linear(3, 3), nn.GELU(), nn.Linear(3, 3))) is None
