"""Security: no loading path runs code from a file, pickle-based models need an explicit
opt-in, every server command binds 127.0.0.1, and the README says how to secure a shared
MLflow server.

The payload is a real one: unpickling it writes a marker file. Each loader gets it and the
marker must never appear; a control at the end shows the payload is live (it does write the
marker when a caller opts in to unpickling), so the refusals are not an artefact of a broken
payload.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", ".git", "tests", "data", "mlruns", "runs", "build", "dist", "node_modules"}


class Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class PayloadModule(torch.nn.Module):
    """An nn.Module (so MLflow's pickle flavour accepts it) that pickles as Payload."""

    def __init__(self, marker: Path):
        super().__init__()
        self.marker = str(marker)

    def __reduce__(self):
        return Payload(Path(self.marker)).__reduce__()


def project_py_files() -> list[Path]:
    out = []
    for path in sorted(REPO_ROOT.rglob("*.py")):
        rel = path.relative_to(REPO_ROOT)
        if rel.parts[0] in SKIP_DIRS or any(p.startswith(".") for p in rel.parts[:-1]):
            continue
        out.append(path)
    return out


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


#: Functions allowed to unpickle: each is the explicit opt-in path (callers must pass
#: allow_pickle=True to reach it).
OPT_IN_FUNCTIONS = {("flows/model_io.py", "_load_pickled")}


def unsafe_loads(path: Path) -> tuple[list[str], list[str]]:
    """(torch.load calls found, findings): every deserialisation call that can run code."""
    rel = path.relative_to(REPO_ROOT).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def enclosing(node: ast.AST) -> str:
        while node in parents:
            node = parents[node]
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                return node.name
        return "<module>"

    torch_loads, findings = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{rel}:{node.lineno} in {enclosing(node)}()"
        opt_in = (rel, enclosing(node)) in OPT_IN_FUNCTIONS
        if name in ("torch.load", "load") and (name == "torch.load" or _kw(node, "weights_only")):
            torch_loads.append(where)
            if not _is_const(_kw(node, "weights_only"), True):
                findings.append(f"{where}: torch.load without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "cPickle.load", "dill.load", "joblib.load"):
            if not opt_in:
                findings.append(f"{where}: {name}")
        elif name in ("np.load", "numpy.load") and not _is_const(
            _kw(node, "allow_pickle") or ast.Constant(False), False
        ):
            findings.append(f"{where}: np.load with allow_pickle not False")
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            loader = _dotted(_kw(node, "Loader")) if _kw(node, "Loader") is not None else ""
            if name != "yaml.load" or loader in ("", "yaml.Loader", "yaml.UnsafeLoader"):
                findings.append(f"{where}: {name} with Loader={loader or 'default'}")
        elif name.endswith(("pytorch.load_model", "pyfunc.load_model")):
            weights_only = _kw(node, "weights_only")
            if weights_only is not None and not _is_const(weights_only, True) and not opt_in:
                findings.append(f"{where}: {name} with weights_only != True outside an opt-in")
    return torch_loads, findings


def test_every_torch_load_is_weights_only(record) -> None:
    files = project_py_files()
    torch_loads, findings = [], []
    for path in files:
        loads, found = unsafe_loads(path)
        torch_loads += loads
        findings += found
    record(
        "security: torch.load audit",
        f"AST scan of {len(files)} project .py files (tests excluded) for torch.load, pickle, "
        "np.load(allow_pickle), unsafe yaml, MLflow pickle loads",
        f"{len(torch_loads)} torch.load calls, findings: {findings or 'none'}",
    )
    assert torch_loads, "the scan found no torch.load at all: is it looking in the right place?"
    assert findings == []


# --------------------------------------------------------------------------- payloads


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def _evil_state(marker: Path) -> dict:
    return {"epoch": 1, "weight": torch.zeros(2), "payload": Payload(marker)}


def _outcome(fn) -> str:
    try:
        fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"
    return "LOADED"


def test_pickle_payload_refused_by_every_loader(tmp_path: Path, marker: Path, record) -> None:
    from flows.model_io import load_vae
    from vae_core.evaluation import classifier as clf
    from vae_core.models import build_vae
    from vae_core.training import load_checkpoint, load_model
    from vae_core.training.checkpoint import MODEL_CONFIG_NAME, MODEL_WEIGHTS_NAME

    evil = tmp_path / "evil.pt"
    torch.save(_evil_state(marker), evil)
    config = build_vae({"hidden_sizes": [8], "latent_dim": 2}).config.to_dict()

    # vae_core.training.load_model: a model folder whose weights file is the payload.
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / MODEL_CONFIG_NAME).write_text(json.dumps(config))
    (model_dir / MODEL_WEIGHTS_NAME).write_bytes(evil.read_bytes())

    # vae_core.evaluation.load_classifier: the classifier's weights file is the payload.
    clf_dir = tmp_path / "classifier"
    clf_dir.mkdir()
    (clf_dir / clf.CONFIG_NAME).write_text(json.dumps({"format_version": 1, "config": {}}))
    (clf_dir / clf.WEIGHTS_NAME).write_bytes(evil.read_bytes())

    # flows.model_io.load_vae: an MLflow model folder whose extra-files weights are the payload.
    mlflow_dir = tmp_path / "mlflow-model"
    (mlflow_dir / "extra_files").mkdir(parents=True)
    (mlflow_dir / "extra_files" / "model.pt").write_bytes(evil.read_bytes())
    (mlflow_dir / "extra_files" / "model_config.json").write_text(json.dumps(config))
    (mlflow_dir / "MLmodel").write_text(
        "flavors:\n  pytorch:\n    model_data: data\n    pytorch_version: 2.0\n"
        "metadata:\n  vae_weights: extra_files/model.pt\n"
        "  vae_config: extra_files/model_config.json\n"
    )

    # The trainer's resume path: a checkpoint folder whose last.pt is the payload.
    from vae_core.training import TrainConfig, Trainer

    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "last.pt").write_bytes(evil.read_bytes())
    trainer = Trainer(build_vae({"hidden_sizes": [8], "latent_dim": 2}), TrainConfig(epochs=1))
    images = torch.zeros(20, 28, 28, dtype=torch.uint8)

    loaders = {
        "load_checkpoint": lambda: load_checkpoint(evil),
        "load_model": lambda: load_model(model_dir),
        "load_classifier": lambda: clf.load_classifier(clf_dir),
        "model_io.load_vae": lambda: load_vae(str(mlflow_dir)),
        "Trainer.fit(resume)": lambda: trainer.fit(images, images[:5], checkpoint_dir=ckpt_dir),
    }
    outcomes = {name: _outcome(fn) for name, fn in loaders.items()}
    record(
        "security: pickle payload x 5 loaders",
        "a torch file whose unpickling writes a marker fed to load_checkpoint, load_model, "
        "load_classifier, flows.model_io.load_vae and the trainer's resume",
        "; ".join(f"{k}: {v.split(':')[0]}" for k, v in outcomes.items())
        + f"; marker written: {marker.exists()}",
    )
    assert not marker.exists(), "a loader ran the payload"
    for name, outcome in outcomes.items():
        assert outcome != "LOADED", f"{name} accepted the payload"
    assert "UnsafeModelError" in outcomes["model_io.load_vae"]


def test_pickled_processed_data_refused(tmp_path: Path, marker: Path, record) -> None:
    from vae_core.data import ProcessedDataError, load_processed, load_split_indices
    from vae_core.data.splits import ARRAY_FILES, INDICES_FILE

    folder = tmp_path / "processed"
    folder.mkdir()
    arrays = {
        "train_images": np.zeros((5, 28, 28), np.uint8),
        "train_labels": np.zeros(5, np.uint8),
        "val_images": np.zeros((2, 28, 28), np.uint8),
        "val_labels": np.zeros(2, np.uint8),
        "holdout_images": np.zeros((2, 28, 28), np.uint8),
        "holdout_labels": np.zeros(2, np.uint8),
        "holdout_binarized": np.zeros((2, 28, 28), np.uint8),
        "test_images": np.zeros((3, 28, 28), np.uint8),
        "test_labels": np.zeros(3, np.uint8),
        "test_binarized": np.zeros((3, 28, 28), np.uint8),
    }
    for name in ARRAY_FILES:
        np.save(folder / f"{name}.npy", arrays[name])
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    np.save(folder / "train_labels.npy", evil, allow_pickle=True)
    np.savez(folder / INDICES_FILE, train=evil, val=evil)
    data = _outcome(lambda: load_processed(folder))
    indices = _outcome(lambda: load_split_indices(folder))
    record(
        "security: pickled .npy / .npz",
        "object arrays whose unpickling writes a marker placed in a processed-data folder",
        f"load_processed: {data.split(':')[0]}; load_split_indices: {indices.split(':')[0]}; "
        f"marker written: {marker.exists()}",
    )
    assert not marker.exists()
    assert data.startswith(ProcessedDataError.__name__)
    assert indices != "LOADED"


def test_pickle_flavoured_mlflow_model_needs_explicit_opt_in(
    tmp_path: Path, marker: Path, record
) -> None:
    import mlflow.pytorch

    from flows.model_io import ModelLoadError, UnsafeModelError, load_vae

    path = tmp_path / "pickled-model"
    # Explicit requirements: inferring them would load (and so run) the model while saving.
    mlflow.pytorch.save_model(
        PayloadModule(marker), str(path), serialization_format="pickle", pip_requirements=["torch"]
    )
    assert not marker.exists()
    refused = _outcome(lambda: load_vae(str(path)))
    marker_after_refusal = marker.exists()
    # Path traversal in the (untrusted) MLmodel metadata is refused too.
    escape = tmp_path / "escape-model"
    escape.mkdir()
    (escape / "MLmodel").write_text(
        "flavors: {}\nmetadata:\n  vae_weights: ../evil.pt\n  vae_config: ../config.json\n"
    )
    traversal = _outcome(lambda: load_vae(str(escape)))
    # Control: with the explicit opt-in the payload does run, so the refusal above is real.
    opted_in = _outcome(lambda: load_vae(str(path), allow_pickle=True))
    record(
        "security: pickle-flavoured MLflow model",
        "an MLflow pytorch model saved with serialization_format=pickle whose unpickling writes "
        "a marker; load_vae without, then with allow_pickle=True; metadata naming ../evil.pt",
        f"without opt-in: {refused.split(':')[0]}, marker {marker_after_refusal}; "
        f"'../' metadata: {traversal.split(':')[0]}; with opt-in the payload ran (marker "
        f"{marker.exists()}) and the load ended {opted_in.split(':')[0]}",
    )
    assert refused.startswith(UnsafeModelError.__name__) and "allow_pickle" in refused
    assert not marker_after_refusal
    assert traversal.startswith(ModelLoadError.__name__) and "escapes" in traversal
    assert marker.exists(), "control failed: the payload never ran, the test proves nothing"


# --------------------------------------------------------------------------- servers

SERVER_COMMAND = re.compile(
    r"(mlflow\s+(?:ui|server)\b|prefect\s+server\s+start\b"
    r"|[\"']mlflow[\"']\s*,\s*[\"'](?:ui|server)[\"']"
    r"|[\"']prefect[\"']\s*,\s*[\"']server[\"']\s*,\s*[\"']start[\"'])"
)
LOCALHOST = re.compile(r"(--host|-h)[\s=\"',]+127\.0\.0\.1\b")
ANY_ADDRESS = "0.0.0." + "0"  # spelled out so this file does not match its own scan


def server_scan_files() -> list[Path]:
    candidates = [REPO_ROOT / "README.md", REPO_ROOT / "prefect.yaml", REPO_ROOT / "Makefile"]
    candidates += [REPO_ROOT / "pyproject.toml", REPO_ROOT / "dvc.yaml"]
    for folder, pattern in (
        ("scripts", "*"),
        ("flows", "*.py"),
        ("vae_core", "*.py"),
        ("docs", "*"),
        (".github", "*"),
    ):
        root = REPO_ROOT / folder
        if root.is_dir():
            candidates += [p for p in root.rglob(pattern) if p.is_file()]
    return sorted({p for p in candidates if p.is_file() and "__pycache__" not in p.parts})


def command_context(text: str, start: int) -> str:
    """The command line a match sits in, with backslash continuations and a Python call's
    argument list joined (up to the closing bracket or 400 characters)."""
    line_start = text.rfind("\n", 0, start) + 1
    end = start
    while True:
        nl = text.find("\n", end)
        if nl == -1:
            end = len(text)
            break
        line = text[line_start:nl] if end == start else text[end:nl]
        end = nl + 1
        if not line.rstrip().endswith("\\"):
            break
    snippet = text[line_start:end]
    if "[" in text[line_start:start] or "(" in text[line_start:start]:
        snippet = text[line_start : min(len(text), start + 400)]
        for closer in ("]", ")"):
            idx = snippet.find(closer, start - line_start)
            if idx != -1:
                snippet = snippet[: idx + 1]
                break
    return snippet


def test_every_server_command_binds_localhost(record) -> None:
    files = server_scan_files()
    commands, violations = [], []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = path.relative_to(REPO_ROOT).as_posix()
        for match in SERVER_COMMAND.finditer(text):
            line_no = text.count("\n", 0, match.start()) + 1
            context = command_context(text, match.start())
            commands.append(f"{rel}:{line_no}")
            if not LOCALHOST.search(context):
                violations.append(f"{rel}:{line_no}: {' '.join(context.split())[:120]}")
        for line_no, line in enumerate(text.splitlines(), start=1):
            if ANY_ADDRESS in line:
                violations.append(f"{rel}:{line_no}: binds all interfaces: {line.strip()[:100]}")
    record(
        "security: servers bind 127.0.0.1",
        f"scan of {len(files)} files (README, scripts/, flows/, vae_core/, prefect.yaml, CI) for "
        "`mlflow ui|server`, `prefect server start` and all-interfaces addresses",
        f"{len(commands)} server command(s) at {commands or 'none'}; "
        f"violations: {violations or 'none'}",
    )
    assert violations == []


def test_readme_explains_basic_auth_and_keeping_credentials_out(record) -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    checks = {
        "basic-auth app (`--app-name basic-auth`)": "--app-name basic-auth" in readme,
        "credentials from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD)": (
            "MLFLOW_TRACKING_USERNAME" in readme and "MLFLOW_TRACKING_PASSWORD" in readme
        ),
        "not in params.yaml": bool(
            re.search(r"(credential|password|secret)[^\n]*params\.yaml", readme, re.I)
            or re.search(r"params\.yaml[^\n]*(credential|password|secret)", readme, re.I)
        ),
        "servers bound to 127.0.0.1": "127.0.0.1" in readme,
    }
    missing = [k for k, ok in checks.items() if not ok]
    record(
        "security: README on shared servers",
        "README.md searched for MLflow basic-auth, credentials via environment, none in "
        "params.yaml, 127.0.0.1 binding",
        f"missing: {missing}" if missing else "all four documented",
    )
    assert missing == [], f"README.md does not explain: {missing}"


def test_params_yaml_holds_no_credentials(record) -> None:
    text = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")
    suspicious = [
        line.strip()
        for line in text.splitlines()
        if re.search(r"(password|passwd|secret|token|api[_-]?key|://[^/\s]+:[^@\s]+@)", line, re.I)
        and not line.lstrip().startswith("#")
    ]
    from flows.params import KNOWN_KEYS

    secret_keys = [k for k in KNOWN_KEYS if re.search(r"password|secret|token|key$", k, re.I)]
    record(
        "security: params.yaml credentials",
        "params.yaml lines and the schema's keys searched for passwords, tokens, keys, "
        "user:pass@ URLs",
        f"suspicious lines: {suspicious or 'none'}; secret-like keys: {secret_keys or 'none'}",
    )
    assert suspicious == [] and secret_keys == []
