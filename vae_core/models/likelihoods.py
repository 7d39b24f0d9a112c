"""Decoder likelihoods p(x|z), evaluated from logits and summed over pixels.

Decoders output logits rather than probabilities so that every log-probability is computed from
logits in float32, numerically stable and safe under bf16 autocast.
`BernoulliLinearHead` is the inference-only fast path of the IWAE evaluation for decoders whose
logits come out of a linear layer: the same log-probability, rewritten so that the per-pixel work
is one fast sigmoid pass (see its docstring).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vae_core.config import LIKELIHOODS


def bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log Bernoulli(x | sigmoid(logits)) summed over all non-batch dimensions, in nats.

    On binary x this is a proper log-likelihood. On grey levels in [0, 1] it is the summed
    binary cross-entropy of the design document, which is *not* a normalized density.
    Computed in float32 (whatever the autocast) by `_BernoulliLogProb`.
    """
    return _BernoulliLogProb.apply(logits.float(), x.float())


class _BernoulliLogProb(torch.autograd.Function):
    """sum over pixels of x l - softplus(l), and its gradient x - sigmoid(l), in few passes.

    Per pixel, x l - softplus(l) = x l - max(l, 0) + log sigmoid(|l|): one vectorized sigmoid
    and one log, where `binary_cross_entropy_with_logits` goes through log-sigmoid, a scalar
    loop on the CPU (about 18x slower than sigmoid on 128 x 784 logits here), and autograd
    through it. sigmoid(|l|) lies in [1/2, 1], so its log loses nothing that matters: at most
    exp(-|l|) < 6e-8 per pixel where float32 rounds sigmoid(|l|) to 1. The backward pass is the
    familiar x - sigmoid(l), computed once. Training steps of the default MLP at batch 128 took
    6-10% less time than with torch's loss (min and median of 30 interleaved 40-step runs).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(logits, x)
        per_pixel = torch.sigmoid(logits.abs()).log_().add_(x * logits).sub_(logits.relu())
        return per_pixel.flatten(1).sum(dim=1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        logits, x = ctx.saved_tensors
        per_example = grad.view(-1, *(1,) * (logits.dim() - 1))
        grad_logits = grad_x = None
        if ctx.needs_input_grad[0]:
            grad_logits = (x - torch.sigmoid(logits)).mul_(per_example)
        if ctx.needs_input_grad[1]:
            grad_x = logits * per_example
        return grad_logits, grad_x


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli (Loaiza-Ganem & Cunningham, 2019).

    C(lambda) = 2 artanh(1 - 2 lambda) / (1 - 2 lambda) for lambda != 1/2, and 2 at 1/2.
    Written in terms of the logit eta: (1 - 2 lambda) = -tanh(eta / 2), so
    C = eta / tanh(eta / 2) ... which is even in eta and tends to 2 as eta -> 0.
    We use a Taylor expansion near 0 to avoid 0/0.
    """
    eta = logits.float()
    small = eta.abs() < 1e-2
    safe = torch.where(small, torch.ones_like(eta), eta)
    # log(eta / tanh(eta/2)) computed stably: for large |eta| tanh -> +-1.
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe.abs() / 2))
    taylor = math.log(2.0) + eta.pow(2) / 12.0
    return torch.where(small, taylor, exact)


def continuous_bernoulli_log_prob(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """log CB(x | lambda) summed over pixels: a normalized density on [0, 1]^D."""
    log_unnormalized = -F.binary_cross_entropy_with_logits(
        logits.float(), x.float(), reduction="none"
    )
    return (log_unnormalized + continuous_bernoulli_log_norm(logits)).flatten(1).sum(dim=1)


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """Mean of the continuous Bernoulli, the image a user expects to see for a decoder output."""
    lam = torch.sigmoid(logits.float()).clamp(1e-6, 1 - 1e-6)
    near_half = (lam - 0.5).abs() < 1e-3
    safe = torch.where(near_half, torch.full_like(lam, 0.25), lam)
    mean = safe / (2 * safe - 1) + 1 / (2 * torch.atanh(1 - 2 * safe))
    return torch.where(near_half, torch.full_like(lam, 0.5), mean)


def log_prob(likelihood: str, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Dispatch by likelihood name (one of vae_core.config.LIKELIHOODS)."""
    return LOG_PROBS[likelihood](x, logits)


LOG_PROBS = {"bernoulli": bernoulli_log_prob, "continuous_bernoulli": continuous_bernoulli_log_prob}
assert tuple(LOG_PROBS) == LIKELIHOODS, "vae_core.config.LIKELIHOODS names the implemented ones"


# torch's elementwise CPU kernels run vectors of 16 floats, two at a time (AVX-512), and the
# elements left over at the end of a contiguous tensor one by one, where exp and sigmoid round
# differently (in the last bit). A tensor of a multiple of this many elements has no such tail.
VECTOR_ELEMENTS = 64


class Scratch:
    """Reusable buffers, one per name, handed out as their first `rows` rows: the fast paths
    write every large intermediate into one (a fresh multi-megabyte tensor per chunk costs
    page faults). One instance per thread."""

    def __init__(self, max_rows: int):
        self.max_rows = max(1, int(max_rows))
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, rows: int, *shape: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1:] != shape or buf.dtype != dtype:
            size = max(rows, self.max_rows + VECTOR_ELEMENTS)
            buf = torch.zeros(size, *shape, dtype=dtype)
            self._buffers[name] = buf
        return buf[:rows]

    def padded(
        self, name: str, rows: int, width: int, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """A buffer of at least `rows` rows of `width`, whole vectors long: exp or
        sigmoid applied to all of it (the real rows are its first `rows`) computes each real
        element as it would in any other chunk, so a sample's log-weight does not depend on
        the chunk it went through (nor the per-example estimate on batching or subsets)."""
        step = VECTOR_ELEMENTS // math.gcd(width, VECTOR_ELEMENTS)
        return self.get(name, -(-rows // step) * step, width, dtype=dtype)


class BernoulliLinearHead:
    """log Bernoulli(x | sigmoid(l)) summed over pixels, for l = h W + b and many h per image.

    Inference only, float32 logits on the CPU, float64 sums. Per pixel, with binary or grey x,
    x l - softplus(l) = (x - 1/2) l - |l| / 2 + log sigmoid(|l|), since softplus(l) =
    (l + |l|) / 2 - log sigmoid(|l|). Summed over pixels:

    * (x - 1/2) . l = h . W (x - 1/2) + b . (x - 1/2): a matrix-vector product per sample with a
      vector computed once per image, instead of an elementwise pass over the logits against x
      repeated for every sample (no x_rep);
    * sum |l|: one in-place abs and a row sum, float32 partial sums of a few terms each added
      in float64 (it nearly cancels the first term on a confident decoder, so both are kept
      in float64);
    * sum log sigmoid(|l|) = log prod sigmoid(|l|): one in-place sigmoid (vectorized, far faster
      than softplus or log1p on the CPU), then products of at most 112 factors, each in
      [1/2, 1] so a product stays above 2**-112 (float32 goes down to 2**-126), and one log
      per product.

    The result equals `bernoulli_log_prob` up to float32 rounding of the logits themselves
    (about 1e-5 nats per image; the float32 sum in `bernoulli_log_prob` is itself less exact).

    With bf16 weights (precision bf16) the product runs on bf16 matrix units and its logits are
    rounded to bf16; |l| is then taken into float32 and everything after it is as above, so
    the figure is the exact log-probability of those rounded logits (x . l uses the same bf16
    weights, widened). sigmoid and log never run in bf16: near 1 its 8-bit mantissa would bias
    the sum of log sigmoid(|l|) by up to a nat per image.
    """

    def __init__(self, weight_t: torch.Tensor, bias: torch.Tensor):
        self.weight_t = weight_t.contiguous()  # (hidden, pixels), float32 or bf16
        self.bias = bias.to(weight_t.dtype).contiguous()  # (pixels,)
        self._weight64 = self.weight_t.double()
        self._bias64 = self.bias.double()
        self.g: torch.Tensor | None = None  # (B, 1, hidden): W (x - 1/2), per image
        self.c0: torch.Tensor | None = None  # (B, 1): b . (x - 1/2)
        self.centred: torch.Tensor | None = None  # (B, pixels, 1): x - 1/2 (bf16 weights)

    @property
    def pixels(self) -> int:
        return self.bias.numel()

    def prepare(self, x: torch.Tensor) -> None:
        """Precompute the per-image vectors of x, shape (B, pixels...), for the next calls."""
        centred = x.reshape(len(x), -1).double() - 0.5
        if centred.shape[1] != self.pixels:
            raise ValueError(f"expected {self.pixels} pixels per image, found {centred.shape[1]}")
        if self.weight_t.dtype == torch.float32:  # x . l = h . g + c0, in float64
            self.g = (centred @ self._weight64.T).unsqueeze(1)
            self.c0 = (centred * self._bias64).sum(-1, keepdim=True)
        else:  # (B, pixels, 1): x . l from the rounded bf16 logits
            self.centred = centred.float().unsqueeze(2)

    def log_prob(
        self, h: torch.Tensor, scratch: Scratch, images: slice = slice(None)
    ) -> torch.Tensor:
        """log p(x | h) of shape (B, c) float64 for h of shape (B, c, hidden), float32, for the
        prepared images `images` (B of them)."""
        assert self.g is not None or self.centred is not None, "call prepare(x) first"
        batch, c, hidden = h.shape
        rows = batch * c
        whole = scratch.padded("logits", rows, self.pixels)
        logits = whole[:rows]
        if self.weight_t.dtype == torch.float32:
            torch.addmm(self.bias, h.reshape(rows, hidden), self.weight_t, out=logits)
            # h . g in float64, elementwise then row sums: unlike a matrix-vector product, the
            # same for a sample whatever else is in the chunk.
            h64 = scratch.get("h64", rows, hidden, dtype=torch.float64).view(batch, c, hidden)
            x_dot_l = h64.copy_(h).mul_(self.g[images]).sum(-1) + self.c0[images]
        else:  # bf16 matrix units; the rounded logits widened to float32 (exactly)
            low = scratch.get("logits_low", rows, self.pixels, dtype=self.weight_t.dtype)
            torch.addmm(self.bias, h.reshape(rows, hidden), self.weight_t, out=low)
            logits.copy_(low)
            # x . l from the same rounded logits as |l| below: the two nearly cancel, and a
            # rounding in one but not the other is noise in every log-weight, which the
            # log-sum-exp turns into a bias (0.035 nats on MNIST, measured).
            dot = torch.bmm(logits.view(batch, c, -1), self.centred[images])
            x_dot_l = dot.view(batch, c).double()
        logits.abs_()
        abs_sum = _row_sum64(logits, scratch)
        whole.sigmoid_()  # the padding rows too: see Scratch.padded
        log_sig_sum = _row_sum_log(logits, scratch)
        return x_dot_l - 0.5 * abs_sum.view(batch, c) + log_sig_sum.view(batch, c)


def _groups(width: int, most: int) -> int:
    """The largest divisor of width that is at most `most` (1 if none larger)."""
    return max(d for d in range(1, most + 1) if width % d == 0)


def _row_sum64(values: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """Row sums in float64 of a float32 (rows, width) tensor, without a float64 copy of it:
    float32 sums of at most 8 terms (a column-block reduction, vectorized), then float64."""
    rows, width = values.shape
    blocks = _groups(width, 8)
    partial = scratch.get("partial", rows, width // blocks)
    torch.sum(values.view(rows, blocks, width // blocks), 1, out=partial)
    wide = scratch.get("partial64", rows, width // blocks, dtype=torch.float64)
    return wide.copy_(partial).sum(1)  # (a scratch copy: sum(dtype=) makes a fresh one)


MAX_FACTORS = 112  # sigmoid(|l|) >= 1/2, and 2**-112 is a normal float32


def _row_sum_log(values: torch.Tensor, scratch: Scratch) -> torch.Tensor:
    """Row sums of log(values), float64, for values in [1/2, 1]: the log of products of at most
    MAX_FACTORS values (a float32 product of them cannot underflow); `values` is overwritten."""
    rows, width = values.shape
    factors = _groups(width, 8)
    if factors > 1:  # one vectorized reduction over column blocks
        width //= factors
        out = scratch.get("partial", rows, width)
        values = torch.prod(values.view(rows, factors, width), 1, out=out)
    while width > 1 and 2 * factors <= MAX_FACTORS:  # then halve the width in place
        half = width // 2
        values[:, :half].mul_(values[:, width - half : width])
        width, factors = width - half, 2 * factors
    return values[:, :width].log().sum(1, dtype=torch.float64)


def mean_image(likelihood: str, logits: torch.Tensor) -> torch.Tensor:
    """The decoder distribution's mean, in [0, 1]."""
    if likelihood == "continuous_bernoulli":
        return continuous_bernoulli_mean(logits)
    return torch.sigmoid(logits.float())
