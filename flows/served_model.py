"""The registered VAE as a served model: one MLflow pyfunc with five methods.

MLflow logs this file itself (models-from-code), not a pickled object: serving or loading the
model runs this code and reads two plain files, the safetensors weights and the config JSON.
A request picks what to do through the signature's params:

    reconstruct     images -> their reconstructions (decoder mean at z = E[z|x]); the default
    encode          images -> {"mu", "logvar"} of q(z|x)
    decode          codes (B, latent_dim) -> images (decoder mean)
    sample          n images from the prior, seeded by `seed` (inputs are ignored)
    log_likelihood  images -> IWAE estimate of log p(x) per image with `k` samples, in nats:
                    the anomaly score (lower is more unusual)

Images are (B, 1, 28, 28), (B, 28, 28) or (B, 784) floats in [0, 1]. A bad request raises an
MlflowException with INVALID_PARAMETER_VALUE, which the scoring server answers with HTTP 400
and a message naming the field; the server keeps serving. Needs vae_core, torch, safetensors
and mlflow where it runs, nothing of Prefect or DVC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import set_model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext

METHODS = ("reconstruct", "encode", "decode", "sample", "log_likelihood")
IMAGE_SHAPE = (1, 28, 28)
PIXELS = 784
# What one request may ask for, so one caller cannot hold the server for minutes.
MAX_BATCH = 1024  # images or codes per request
MAX_SAMPLES = 1024  # `n` of sample
MAX_K = 5000  # `k` of log_likelihood (the published protocol's k)
MAX_DECODER_ROWS = 200_000  # images x k per log_likelihood request (40 images at k=5000)

# Keys of the MLflow artifacts this model reads (model_io logs them under these names).
WEIGHTS_ARTIFACT = "weights"
CONFIG_ARTIFACT = "config"


def bad_request(field: str, expected: str, found: Any) -> MlflowException:
    """The error a caller gets back as HTTP 400: the field, what was expected, what came."""
    return MlflowException(
        f"{field}: expected {expected}, found {found}", error_code=INVALID_PARAMETER_VALUE
    )


def _as_array(model_input: Any) -> np.ndarray:
    """The request's inputs as a float array (JSON `inputs`, a DataFrame, or a numpy array)."""
    if hasattr(model_input, "to_numpy"):  # a pandas DataFrame from `dataframe_split`
        model_input = model_input.to_numpy()
    try:
        array = np.asarray(model_input, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        found = f"{type(model_input).__name__} ({exc})"
        raise bad_request("inputs", "an array of numbers", found) from None
    if array.size and not np.isfinite(array).all():
        raise bad_request("inputs", "finite numbers", f"{int((~np.isfinite(array)).sum())} NaN/inf")
    return array


def _batch_size(array: np.ndarray, what: str) -> int:
    if len(array) < 1 or len(array) > MAX_BATCH:
        raise bad_request("inputs", f"1 to {MAX_BATCH} {what} per request", f"{len(array)}")
    return len(array)


def as_images(model_input: Any) -> torch.Tensor:
    """(B, 1, 28, 28) float32 in [0, 1] from any of the accepted layouts, or a 400."""
    array = _as_array(model_input)
    if array.ndim == 0 or array[0].size != PIXELS or array.ndim not in (2, 3, 4):
        raise bad_request(
            "inputs", "images of shape (B, 1, 28, 28), (B, 28, 28) or (B, 784)", array.shape
        )
    _batch_size(array, "images")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise bad_request("inputs", "pixel values in [0, 1]", f"values from {low:g} to {high:g}")
    return torch.from_numpy(array.astype(np.float32)).reshape(-1, *IMAGE_SHAPE)


def as_codes(model_input: Any, latent_dim: int) -> torch.Tensor:
    """(B, latent_dim) float32 latent codes, or a 400."""
    array = _as_array(model_input)
    if array.ndim != 2 or array.shape[1] != latent_dim:
        raise bad_request("inputs", f"latent codes of shape (B, {latent_dim})", array.shape)
    _batch_size(array, "codes")
    return torch.from_numpy(array.astype(np.float32))


def _int_param(params: dict, name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise bad_request(f"params.{name}", f"an integer from {low} to {high}", repr(value))
    if not low <= int(value) <= high:
        raise bad_request(f"params.{name}", f"an integer from {low} to {high}", value)
    return int(value)


class ServedVAE(PythonModel):
    """A VAE rebuilt from safetensors weights and its config; predict dispatches on `method`."""

    def load_context(self, context: Any) -> None:
        from safetensors.torch import load_file

        from vae_core.evaluation.report import likelihood_kind
        from vae_core.training.checkpoint import rebuild_vae

        self.model, saved = rebuild_vae(
            Path(context.artifacts[WEIGHTS_ARTIFACT]),
            Path(context.artifacts[CONFIG_ARTIFACT]),
            read_weights=lambda path: load_file(str(path), device="cpu"),
        )
        self.data_variant = str(saved.get("data_variant", "binarized"))
        likelihood = self.model.config.likelihood
        self.kind, self.kind_sentence = likelihood_kind(likelihood, self.data_variant)

    def predict(
        self,
        context: PythonModelContext,
        model_input: np.ndarray,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Dispatch on params["method"] (default reconstruct); see the module docstring.

        ``model_input`` is what a request's JSON `inputs` become; a DataFrame (a
        `dataframe_split` request) or a list from a Python caller is converted by `_as_array`.
        MLflow infers no input schema from an ndarray hint (the inputs differ by method), so the
        logged signature, params only, stays the model's."""
        params = params or {}
        method = params.get("method", "reconstruct")
        if method not in METHODS:
            raise bad_request("params.method", f"one of {', '.join(METHODS)}", repr(method))
        with torch.inference_mode():
            return getattr(self, f"_{method}")(model_input, params)

    def _reconstruct(self, model_input: Any, params: dict) -> np.ndarray:
        return self.model.reconstruct(as_images(model_input)).float().numpy()

    def _encode(self, model_input: Any, params: dict) -> dict[str, np.ndarray]:
        mu, logvar = self.model.encode(as_images(model_input))
        return {"mu": mu.float().numpy(), "logvar": logvar.float().numpy()}

    def _decode(self, model_input: Any, params: dict) -> np.ndarray:
        from vae_core.models.likelihoods import mean_image

        logits = self.model.decode(as_codes(model_input, self.model.latent_dim))
        return mean_image(self.model.config.likelihood, logits).float().numpy()

    def _sample(self, model_input: Any, params: dict) -> np.ndarray:
        n = _int_param(params, "n", 16, 1, MAX_SAMPLES)
        seed = _int_param(params, "seed", 0, 0, 2**63 - 1)
        generator = torch.Generator().manual_seed(seed)
        return self.model.sample(n, generator=generator).float().numpy()

    def _log_likelihood(self, model_input: Any, params: dict) -> dict[str, Any]:
        from vae_core.evaluation.likelihood import iwae_log_likelihood

        if self.kind.startswith("not_a_likelihood"):
            raise bad_request(
                "params.method",
                "a model whose decoder gives a likelihood of its data",
                f"log_likelihood asked of a {self.kind_sentence.split(':')[0]} model",
            )
        images = as_images(model_input)
        if self.data_variant == "binarized" and not torch.all((images == 0) | (images == 1)):
            raise bad_request(
                "inputs",
                "binary pixels (0 or 1) for a model trained on binarized data (binarize first, "
                "e.g. x > 0.5)",
                "grey levels",
            )
        k = _int_param(params, "k", 100, 1, MAX_K)
        if len(images) * k > MAX_DECODER_ROWS:
            raise bad_request(
                "params.k",
                f"images x k <= {MAX_DECODER_ROWS:,} per request",
                f"{len(images)} x {k} = {len(images) * k:,}",
            )
        seed = _int_param(params, "seed", 0, 0, 2**63 - 1)
        log_px = iwae_log_likelihood(self.model, images, k, seed=seed)
        return {
            "log_likelihood": log_px,
            "estimator": f"IWAE bound with k={k}, nats per image ({self.data_variant} pixels)",
        }


set_model(ServedVAE())
