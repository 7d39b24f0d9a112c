"""The registered VAE served for real (`mlflow models serve` on 127.0.0.1) and asked over HTTP:
each method's answer is checked against the same VAE rebuilt in this process, so a wrong answer
fails; each bad request gets HTTP 400 naming the field, and the server goes on answering."""

import json
import urllib.error
import urllib.request
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import torch
from helpers import bin_path, child_env, free_port, wait_for_http
from mlflow import MlflowClient

from flows.model_io import load_vae, log_vae
from vae_core.config import TrainConfig, VAEConfig
from vae_core.data.sources import embedded_csv_path, read_embedded_csv
from vae_core.evaluation.likelihood import iwae_log_likelihood
from vae_core.models.factory import build_vae
from vae_core.models.likelihoods import mean_image
from vae_core.training import Trainer

MODEL = "mnist-vae"
pytestmark = pytest.mark.slow  # a model server, and a model trained for three epochs


@pytest.fixture(scope="module")
def served(tmp_path_factory, start_process, isolated_mlflow_uri) -> SimpleNamespace:
    # A small VAE (20 latent units, as the default) after three short epochs on 500 of the
    # embedded MNIST digits: its answers differ by input, unlike an untrained decoder's grey.
    digits, _ = read_embedded_csv(embedded_csv_path())
    images = torch.from_numpy(digits[:600].reshape(-1, 1, 28, 28))
    config = TrainConfig(epochs=3, batch_size=32, device="cpu", patience=0, seed=0)
    model = build_vae(VAEConfig(hidden_sizes=[64], latent_dim=20), seed=0)
    trainer = Trainer(model, config, progress=False)
    trainer.fit(images[:500], images[500:])
    root = tmp_path_factory.mktemp("served")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.create_experiment("served", artifact_location=(root / "mlruns").as_uri())
    with mlflow.start_run(experiment_id=experiment):
        info = log_vae(trainer.model.eval(), "binarized")
    version = mlflow.register_model(info.model_uri, MODEL)
    MlflowClient(uri).set_registered_model_alias(MODEL, "champion", version.version)

    port = free_port()
    cmd = [bin_path("mlflow"), "models", "serve", "-m", f"models:/{MODEL}@champion"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    proc = start_process("model-server", cmd, env=child_env(MLFLOW_TRACKING_URI=uri), cwd=root)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/ping", proc, timeout_s=240)
    rebuilt = load_vae(f"models:/{MODEL}@champion")
    test_images = (images[500:504].float() / 255.0 > 0.5).float().reshape(4, 1, 28, 28)
    return SimpleNamespace(url=url, proc=proc, vae=rebuilt, images=test_images)


def post(served: SimpleNamespace, body: dict | str) -> tuple[int, dict]:
    """POST /invocations; (status, parsed JSON body), for errors too."""
    data = body if isinstance(body, str) else json.dumps(body)
    url, headers = f"{served.url}/invocations", {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data.encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def predictions(served: SimpleNamespace, inputs, **params) -> object:
    status, body = post(served, {"inputs": inputs, "params": params})
    assert status == 200, body
    return body["predictions"]


def test_each_method_answers_as_the_vae_rebuilt_here(served) -> None:
    x, vae = served.images, served.vae
    # reconstruct, the default; (B, 784) is accepted too; answers depend on the input.
    expected = vae.reconstruct(x).numpy()
    by_default = np.asarray(predictions(served, x.tolist()), dtype=np.float32)
    assert by_default.shape == (4, 1, 28, 28)
    np.testing.assert_allclose(by_default, expected, atol=1e-5)
    flat = np.asarray(predictions(served, x.reshape(4, 784).tolist(), method="reconstruct"))
    np.testing.assert_allclose(flat, expected, atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 1e-3
    # encode: the mean and log-variance of q(z|x).
    answer = predictions(served, x.tolist(), method="encode")
    mu, logvar = (t.detach().numpy() for t in vae.encode(x))
    np.testing.assert_allclose(np.asarray(answer["mu"]), mu, atol=1e-5)
    np.testing.assert_allclose(np.asarray(answer["logvar"]), logvar, atol=1e-5)
    assert np.asarray(answer["mu"]).shape == (4, 20)
    # decode: codes to the decoder's mean image.
    z = torch.randn(3, 20, generator=torch.Generator().manual_seed(1))
    answer = np.asarray(predictions(served, z.tolist(), method="decode"), dtype=np.float32)
    expected = mean_image("bernoulli", vae.decode(z)).detach().numpy()
    np.testing.assert_allclose(answer, expected, atol=1e-5)
    # sample: seeded.
    first, again, other = (
        np.asarray(predictions(served, [], method="sample", n=5, seed=s)) for s in (7, 7, 8)
    )
    expected = vae.sample(5, generator=torch.Generator().manual_seed(7)).numpy()
    assert first.shape == (5, 1, 28, 28)
    np.testing.assert_allclose(first, expected, atol=1e-5)
    assert np.array_equal(first, again) and not np.allclose(first, other)
    # log_likelihood: the IWAE estimate with k samples.
    answer = predictions(served, x.tolist(), method="log_likelihood", k=50, seed=3)
    expected = iwae_log_likelihood(vae, x, 50, seed=3)
    np.testing.assert_allclose(answer["log_likelihood"], expected, atol=1e-3)
    assert answer["estimator"] == "IWAE bound with k=50, nats per image (binarized pixels)"
    assert all(-800 < v < 0 for v in answer["log_likelihood"])


BAD_REQUESTS = [
    ("wrong shape", {"inputs": [[0.1, 0.2, 0.3]]}, ["inputs", "(B, 1, 28, 28)", "(1, 3)"]),
    ("above 1", {"inputs": np.full((1, 784), 2.0).tolist()}, ["inputs", "[0, 1]", "to 2"]),
    ("below 0", {"inputs": np.full((1, 784), -0.5).tolist()}, ["inputs", "[0, 1]", "-0.5"]),
    ("unknown method", {"inputs": [[0.0] * 784], "params": {"method": "denoise"}},
     ["params.method", "reconstruct, encode, decode, sample, log_likelihood", "'denoise'"]),
    ("n too large", {"inputs": [], "params": {"method": "sample", "n": 100_000}},
     ["params.n", "1 to 1024", "100000"]),
    ("n not a number", {"inputs": [], "params": {"method": "sample", "n": "many"}}, ["'n'"]),
    ("k too large", {"inputs": [[0.0] * 784], "params": {"method": "log_likelihood", "k": 10**6}},
     ["params.k", "1 to 5000", "1000000"]),
    ("images x k too large",
     {"inputs": np.zeros((50, 784)).tolist(), "params": {"method": "log_likelihood", "k": 5000}},
     ["params.k", "images x k <= 200,000", "50 x 5000"]),
    ("too many images", {"inputs": np.zeros((1025, 784)).tolist()},
     ["inputs", "1 to 1024 images", "1025"]),
    ("codes of the wrong size", {"inputs": [[0.0] * 7], "params": {"method": "decode"}},
     ["inputs", "(B, 20)", "(1, 7)"]),
    ("grey levels to a binarized model",
     {"inputs": np.full((1, 784), 0.5).tolist(), "params": {"method": "log_likelihood"}},
     ["inputs", "binary pixels (0 or 1)", "grey levels"]),
    ("NaN pixels", '{"inputs": [[NaN' + ", 0.0" * 783 + "]]}",
     ["inputs: expected finite numbers, found 1 NaN/inf"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "body, words", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_400_naming_the_field_and_the_server_keeps_serving(served, body, words):
    status, answer = post(served, body)
    assert status == 400, answer
    for word in words:
        assert word in answer["message"], (word, answer["message"][:500])
    assert served.proc.alive()
    assert np.asarray(predictions(served, served.images[:1].tolist())).shape == (1, 1, 28, 28)
