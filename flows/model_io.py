"""The VAE as an MLflow model: logged pickle-free, served with five methods, rebuilt anywhere.

The model is a pyfunc logged as code (MLflow's models-from-code): `flows/served_model.py` is
copied into the model beside two plain files, `artifacts/model.safetensors` (the weights) and
`artifacts/model_config.json` (the network and the data variant it was trained on). Serving it
(`mlflow models serve -m models:/mnist-vae@champion`) answers reconstruct, encode, decode,
sample and log_likelihood requests (see that file); `load_vae` rebuilds the full VAE from the
two files without running the served code. vae_core travels with the model as code, so the
model needs only the pip requirements it lists.

Nothing here unpickles: safetensors is a flat tensor format, a `.pt` weights file is read with
`torch.load(weights_only=True)`, and a pickle-flavoured MLflow model is refused unless the
caller passes `allow_pickle=True`. Versions logged before the served model (a pt2 program with
`extra_files/`) still load.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ParamSchema, ParamSpec
from safetensors.torch import load_file, save_file

import vae_core
from flows import served_model
from vae_core.errors import VaeError
from vae_core.models.vae import VAE
from vae_core.training.checkpoint import (
    MODEL_CONFIG_NAME,
    MODEL_WEIGHTS_NAME,
    ModelFileError,
    UnsafeWeightsError,
    read_state_dict,
    rebuild_vae,
)

IMAGE_SHAPE = served_model.IMAGE_SHAPE
SAFETENSORS_NAME = "model.safetensors"
ARTIFACTS_DIR = "artifacts"  # where a pyfunc keeps its artifacts inside the model folder
EXTRA_DIR = "extra_files"  # where the earlier pt2 format kept them
EXAMPLE_BATCH = 2
EXAMPLE_SEED = 0
SERVED_CODE = Path(served_model.__file__)

# Keys in the MLmodel `metadata` block; other code (and people) read them.
META_WEIGHTS = "vae_weights"
META_CONFIG = "vae_config"
META_SHA256 = "vae_weights_sha256"
META_FORMAT = "vae_weights_format"
META_METHODS = "vae_methods"
META_DATA_VARIANT = "vae_data_variant"


class ModelLoadError(VaeError, RuntimeError):
    """The MLflow model cannot be turned into a VAE (missing, unsafe or inconsistent files)."""


class UnsafeModelError(ModelLoadError):
    """Loading would unpickle arbitrary objects, which can run code."""


def served_signature() -> ModelSignature:
    """Params only: the inputs differ by method (images, codes, nothing), so the served code
    checks them itself and names the field in its 400s; MLflow checks the params' types."""
    return ModelSignature(
        params=ParamSchema(
            [
                ParamSpec("method", "string", "reconstruct"),
                ParamSpec("n", "long", 16),
                ParamSpec("k", "long", 100),
                ParamSpec("seed", "long", 0),
            ]
        )
    )


def default_input_example() -> np.ndarray:
    """A seeded batch of EXAMPLE_BATCH binary images, the same bytes on every machine: the
    model's `serving_input_example.json`, a request body every image method accepts."""
    rng = np.random.default_rng(EXAMPLE_SEED)
    return (rng.random((EXAMPLE_BATCH, *IMAGE_SHAPE)) < 0.2).astype(np.float32)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors (read here: vae_core does not depend on it) or a
    weights-only torch file (vae_core's reader); never unpickles objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path), device="cpu")
    return read_state_dict(path)


def _rebuild(weights_path: Path, config_path: Path) -> tuple[VAE, dict[str, Any]]:
    """vae_core's rebuild_vae with safetensors support, its errors raised as this module's."""
    try:
        return rebuild_vae(weights_path, config_path, read_weights=_read_weights)
    except UnsafeWeightsError as exc:
        raise UnsafeModelError(str(exc)) from exc
    except ModelFileError as exc:
        raise ModelLoadError(str(exc)) from exc


def _pip_requirements() -> list[str]:
    """Pinned from the installed distributions (torch.__version__ carries a +cuXXX suffix that
    pip cannot match), and given explicitly so MLflow skips its slow requirement inference."""
    names = ("torch", "torchvision", "numpy", "safetensors")
    return [f"{dist}=={importlib.metadata.version(dist)}" for dist in names]


def log_vae(
    vae: VAE, data_variant: str, name: str = "model", input_example: np.ndarray | None = None
) -> ModelInfo:
    """Log a trained VAE to the active MLflow run as the served model (the caller's model is
    left as it was). `input_example`: a batch of images; by default a seeded random pair."""
    if mlflow.active_run() is None:
        raise RuntimeError("log_vae: expected an active MLflow run (mlflow.start_run), found none")
    vae = copy.deepcopy(vae).cpu().float().eval()
    config = vae.config.to_dict() | {"data_variant": data_variant}
    example = default_input_example() if input_example is None else np.asarray(input_example)
    if example.shape[1:] != IMAGE_SHAPE or len(example) < 1:
        raise ValueError(f"input_example: expected shape (B, 1, 28, 28), found {example.shape}")
    with tempfile.TemporaryDirectory() as tmp:
        st_path = Path(tmp) / SAFETENSORS_NAME
        save_file({k: v.detach().contiguous() for k, v in vae.state_dict().items()}, str(st_path))
        cfg_path = Path(tmp) / MODEL_CONFIG_NAME
        cfg_path.write_text(json.dumps(config, indent=2) + "\n")
        metadata = {
            META_WEIGHTS: f"{ARTIFACTS_DIR}/{SAFETENSORS_NAME}",
            META_CONFIG: f"{ARTIFACTS_DIR}/{MODEL_CONFIG_NAME}",
            META_SHA256: _sha256(st_path),
            META_FORMAT: "safetensors",
            META_METHODS: ", ".join(served_model.METHODS),
            META_DATA_VARIANT: data_variant,
        }
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(SERVED_CODE),
            artifacts={
                served_model.WEIGHTS_ARTIFACT: str(st_path),
                served_model.CONFIG_ARTIFACT: str(cfg_path),
            },
            code_paths=[str(Path(vae_core.__file__).parent)],
            signature=served_signature(),
            input_example=(example.astype(np.float32), {"method": "reconstruct"}),
            metadata=metadata,
            pip_requirements=_pip_requirements(),
        )


@contextmanager
def _downloaded(model_uri: str, dst_path: Path | None = None):
    """The model folder on local disk (downloading is not deserializing)."""
    if dst_path is not None:
        Path(dst_path).mkdir(parents=True, exist_ok=True)
        yield Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst_path)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=tmp))


def _inside(root: Path, relative: str) -> Path:
    """root/relative, refusing paths that escape the model folder (metadata is untrusted)."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root.resolve()):
        raise ModelLoadError(f"{relative!r}: path escapes the model folder")
    return path


def _locate_weights(root: Path, mlmodel: Model) -> tuple[Path, Path] | None:
    """(weights, config) named by our metadata, else the usual extra-file names, else None."""
    meta = mlmodel.metadata or {}
    if META_WEIGHTS in meta and META_CONFIG in meta:
        weights = _inside(root, str(meta[META_WEIGHTS]))
        config = _inside(root, str(meta[META_CONFIG]))
        if not weights.is_file() or not config.is_file():
            raise ModelLoadError(f"{root}: the MLmodel metadata names files that are missing")
        expected = meta.get(META_SHA256)
        if expected and _sha256(weights) != expected:
            raise ModelLoadError(f"{weights}: sha256 differs from the one recorded at logging")
        return weights, config
    for folder in (root / ARTIFACTS_DIR, root / EXTRA_DIR):
        for weights_name in (SAFETENSORS_NAME, MODEL_WEIGHTS_NAME):
            if (folder / weights_name).is_file() and (folder / MODEL_CONFIG_NAME).is_file():
                return folder / weights_name, folder / MODEL_CONFIG_NAME
    return None


def _load_pickled(root: Path) -> tuple[VAE, dict[str, Any]]:
    """Only on explicit request: the pickle flavour runs whatever code the file names."""
    previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
    os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "true"
    try:
        model = mlflow.pytorch.load_model(str(root), weights_only=False)
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", None)
        else:
            os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous
    if not isinstance(model, VAE):
        raise ModelLoadError(f"{root}: the pickled model is a {type(model).__name__}, not a VAE")
    return model.cpu().eval(), model.config.to_dict()


def load_vae_with_config(
    model_uri: str, *, allow_pickle: bool = False, dst_path: Path | None = None
) -> tuple[VAE, dict[str, Any]]:
    """The full VAE (on CPU, eval mode) and its config dict (with data_variant when recorded).

    Accepts any MLflow model URI: `models:/name@alias`, `models:/name/3`, `runs:/id/model`,
    `models:/m-...` or a local folder.
    """
    try:
        with _downloaded(model_uri, dst_path) as root:
            mlmodel = Model.load(str(root))
            found = _locate_weights(root, mlmodel)
            if found is not None:
                return _rebuild(*found)
            flavor = mlmodel.flavors.get("pytorch", {})
            data_dir = root / str(flavor.get("model_data", "data"))
            if (data_dir / "model.pth").is_file():
                if not allow_pickle:
                    raise UnsafeModelError(
                        f"{model_uri}: a pickle-flavoured PyTorch model; loading it can run "
                        "arbitrary code. Pass allow_pickle=True only if you trust its source."
                    )
                return _load_pickled(root)
            raise ModelLoadError(
                f"{model_uri}: no VAE weights and config beside the model (expected "
                f"{ARTIFACTS_DIR}/{SAFETENSORS_NAME} and {ARTIFACTS_DIR}/{MODEL_CONFIG_NAME}, "
                "named in the MLmodel metadata)"
            )
    except MlflowException as exc:
        raise ModelLoadError(f"{model_uri}: {exc.message}") from exc


def load_vae(model_uri: str, *, allow_pickle: bool = False, dst_path: Path | None = None) -> VAE:
    """Rebuild the full VAE from an MLflow model URI without unpickling (see module doc)."""
    return load_vae_with_config(model_uri, allow_pickle=allow_pickle, dst_path=dst_path)[0]


def verify_logged_model(
    model_uri: str, x: torch.Tensor | None = None, atol: float = 1e-5
) -> dict[str, float]:
    """Check the served model (loaded as MLflow's pyfunc, i.e. running the logged code) agrees
    with the VAE rebuilt from its files: reconstructions and encodings.

    Returns the largest absolute differences; raises ModelLoadError beyond `atol`.
    """
    vae = load_vae(model_uri)
    if x is None:
        x = torch.from_numpy(default_input_example())
    x = x.detach().cpu().float()
    with torch.no_grad():
        expected_images = vae(x)
        expected_mu, _ = vae.encode(x)
    served = mlflow.pyfunc.load_model(model_uri)
    images = np.asarray(served.predict(x.numpy()), dtype=np.float32)
    codes = served.predict(x.numpy(), params={"method": "encode"})
    diffs = {
        "reconstruct_max_abs_diff": float(np.abs(images - expected_images.numpy()).max()),
        "encode_max_abs_diff": float(np.abs(codes["mu"] - expected_mu.numpy()).max()),
    }
    if not max(diffs.values()) <= atol:
        raise ModelLoadError(f"{model_uri}: the served model disagrees with the VAE: {diffs}")
    return diffs
