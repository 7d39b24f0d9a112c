"""Security: no loading path runs code from a file, pickle-based models need an explicit
opt-in, servers bind 127.0.0.1, the README says how to secure a shared MLflow server. The
payload is real (unpickling it writes a marker file); a control shows it does run when a caller
opts in, so the refusals are not an artefact of a broken payload."""

import ast
import json
import re
from pathlib import Path

import mlflow.pytorch
import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, Payload, payload_module

from flows.model_io import ModelLoadError, UnsafeModelError, load_vae
from vae_core.data import ProcessedDataError, load_processed, load_split_indices
from vae_core.data.splits import ARRAY_FILES, INDICES_FILE
from vae_core.evaluation import classifier as clf
from vae_core.models import build_vae
from vae_core.training import TrainConfig, Trainer
from vae_core.training import checkpoint as ck

SKIP_DIRS = {".venv", ".git", "tests", "data", "mlruns", "runs", "build", "dist", "node_modules"}


def project_py_files() -> list[Path]:
    """Every .py file of the project (top-level folders in SKIP_DIRS and dot-folders left out)."""
    tops = [p for p in REPO_ROOT.iterdir() if p.name not in SKIP_DIRS and p.name[0] != "."]
    files = [f for top in tops for f in ([top] if top.is_file() else top.rglob("*.py"))]
    rel = [f.relative_to(REPO_ROOT) for f in files if f.suffix == ".py"]
    return sorted(REPO_ROOT / r for r in rel if not any(p[0] == "." for p in r.parts[:-1]))


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str):
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


#: Functions allowed to unpickle: each is the explicit opt-in path (callers must pass
#: allow_pickle=True to reach it).
OPT_IN_FUNCTIONS = {("flows/model_io.py", "_load_pickled")}


def unsafe_loads(path: Path) -> tuple[list[str], list[str]]:
    """(torch.load calls found, findings): every deserialisation call that can run code."""
    rel = path.relative_to(REPO_ROOT).as_posix()
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
    # The innermost function around each node (ast.walk is breadth-first: inner ones come later).
    funcs = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
    enclosing = {n: f.name for f in funcs for n in ast.walk(f) if n is not f}
    torch_loads, findings = [], []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name, function = _dotted(node.func), enclosing.get(node, "<module>")
        where = f"{rel}:{node.lineno} in {function}()"
        opt_in = (rel, function) in OPT_IN_FUNCTIONS
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
    scans = [unsafe_loads(path) for path in files]
    torch_loads = [where for loads, _ in scans for where in loads]
    findings = [finding for _, found in scans for finding in found]
    record(
        "security: torch.load audit",
        f"AST scan of {len(files)} project .py files for torch.load, pickle, np.load, unsafe "
        "yaml, MLflow pickle loads",
        f"{len(torch_loads)} torch.load calls, findings: {findings or 'none'}",
    )
    assert torch_loads, "the scan found no torch.load at all: is it looking in the right place?"
    assert findings == []


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "PWNED"


def _refusal(fn) -> Exception | None:
    """The exception ``fn`` raised (None if it loaded)."""
    try:
        fn()
    except Exception as exc:
        return exc


def _name(exc: Exception | None) -> str:
    return "LOADED" if exc is None else type(exc).__name__


def check_refused(name: str, exc: Exception | None, kind: type, fragments: list, marker: Path):
    """``exc`` is the refusal ``kind`` with every fragment in its message; no payload ran."""
    assert not marker.exists(), f"{name} ran the payload"
    assert isinstance(exc, kind), f"{name}: expected {kind.__name__}, got {exc!r}"
    for fragment in fragments:
        assert fragment in str(exc), f"{name}: {fragment!r} not in {exc}"


#: torch's weights-only unpickler refusing the payload's callable: the refusal itself, not
#: some other failure on the way.
REFUSED_GLOBAL = "Unsupported global: GLOBAL exec"


def test_pickle_payload_refused_by_every_loader(tmp_path: Path, marker: Path, record) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"epoch": 1, "weight": torch.zeros(2), "payload": Payload(marker)}, evil)
    payload, vae = evil.read_bytes(), build_vae({"hidden_sizes": [8], "latent_dim": 2})
    config = json.dumps(vae.config.to_dict()).encode()
    model_dir, clf_dir, mlflow_dir, ckpt_dir = (
        tmp_path / d for d in ("model", "classifier", "mlflow-model", "checkpoints")
    )
    files = {
        model_dir / ck.MODEL_CONFIG_NAME: config,
        model_dir / ck.MODEL_WEIGHTS_NAME: payload,
        clf_dir / clf.CONFIG_NAME: b'{"format_version": 1, "config": {}}',
        clf_dir / clf.WEIGHTS_NAME: payload,
        mlflow_dir / "MLmodel": b"flavors:\n  pytorch:\n    model_data: data\nmetadata:\n"
        b"  vae_weights: extra/model.pt\n  vae_config: extra/config.json\n",
        mlflow_dir / "extra" / "model.pt": payload,
        mlflow_dir / "extra" / "config.json": config,
        ckpt_dir / "last.pt": payload,
    }
    for path, content in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    trainer = Trainer(vae, TrainConfig(epochs=1))
    images = torch.zeros(20, 28, 28, dtype=torch.uint8)
    W, M = ck.UnsafeWeightsError, UnsafeModelError
    resume = lambda: trainer.fit(images, images[:5], checkpoint_dir=ckpt_dir)  # noqa: E731
    cases = {  # loader: (the call, the refusal expected, the file its message names)
        "load_checkpoint": (lambda: ck.load_checkpoint(evil), W, evil),
        "load_model": (lambda: ck.load_model(model_dir), W, model_dir / ck.MODEL_WEIGHTS_NAME),
        "load_classifier": (lambda: clf.load_classifier(clf_dir), W, clf_dir / clf.WEIGHTS_NAME),
        "model_io.load_vae": (lambda: load_vae(str(mlflow_dir)), M, "extra/model.pt"),
        "Trainer.fit(resume)": (resume, W, ckpt_dir / "last.pt"),
    }
    outcomes = {}
    for name, (load, kind, named) in cases.items():
        outcomes[name] = _refusal(load)
        check_refused(
            name, outcomes[name], kind, [f"{named}: not a weights-only", REFUSED_GLOBAL], marker
        )
    record(
        "security: pickle payload x 5 loaders",
        "a torch file whose unpickling writes a marker, fed to each weights loader and resume",
        "; ".join(f"{k}: {_name(v)}" for k, v in outcomes.items())
        + f"; marker written: {marker.exists()}",
    )


def test_pickled_processed_data_refused(tmp_path: Path, marker: Path, record) -> None:
    folder = tmp_path / "processed"
    folder.mkdir()
    sizes = {"train": 5, "val": 2, "holdout": 2, "test": 3}
    for name in ARRAY_FILES:
        split, kind = name.split("_", 1)
        shape = (sizes[split],) if kind == "labels" else (sizes[split], 28, 28)
        np.save(folder / f"{name}.npy", np.zeros(shape, np.uint8))
    evil = np.empty(1, dtype=object)
    evil[0] = Payload(marker)
    np.save(folder / "train_labels.npy", evil, allow_pickle=True)
    np.savez(folder / INDICES_FILE, train=evil, val=evil)
    data = _refusal(lambda: load_processed(folder))
    indices = _refusal(lambda: load_split_indices(folder))
    record(
        "security: pickled .npy / .npz",
        "object arrays whose unpickling writes a marker, in a processed-data folder",
        f"load_processed: {_name(data)}; load_split_indices: {_name(indices)}; "
        f"marker written: {marker.exists()}",
    )
    npy = f"{folder / 'train_labels.npy'}: expected a .npy array that loads without pickle"
    check_refused("load_processed", data, ProcessedDataError, [npy], marker)
    npz = [INDICES_FILE, "Object arrays cannot be loaded when allow_pickle=False"]
    check_refused("load_split_indices", indices, ProcessedDataError, npz, marker)


def test_pickle_flavoured_mlflow_model_needs_explicit_opt_in(tmp_path, marker, record):
    path = tmp_path / "pickled-model"
    # Explicit requirements: inferring them would load (and so run) the model while saving.
    mlflow.pytorch.save_model(
        payload_module(marker), str(path), serialization_format="pickle", pip_requirements=["torch"]
    )
    assert not marker.exists()
    refused = _refusal(lambda: load_vae(str(path)))
    check_refused("load_vae", refused, UnsafeModelError, [str(path), "allow_pickle=True"], marker)
    # Path traversal in the (untrusted) MLmodel metadata is refused too.
    escape = tmp_path / "escape-model"
    escape.mkdir()
    (escape / "MLmodel").write_text(
        "flavors: {}\nmetadata:\n  vae_weights: ../evil.pt\n  vae_config: ../config.json\n"
    )
    traversal = _refusal(lambda: load_vae(str(escape)))
    check_refused("load_vae", traversal, ModelLoadError, ["'../evil.pt': path escapes"], marker)
    # Control: with the explicit opt-in the payload does run, so the refusal above is real.
    opted_in = _refusal(lambda: load_vae(str(path), allow_pickle=True))
    record(
        "security: pickle-flavoured MLflow model",
        "MLflow model pickled with a marker-writing payload: load_vae without, then with "
        "allow_pickle=True; MLmodel metadata naming ../evil.pt",
        f"no opt-in: {_name(refused)}; '../': {_name(traversal)}; opt-in: marker written "
        f"{marker.exists()}, load ended {_name(opted_in)}",
    )
    assert marker.exists(), "control failed: the payload never ran, the test proves nothing"


SERVER_COMMAND = re.compile(
    r"(mlflow\s+(?:ui|server)\b|prefect\s+server\s+start\b"
    r"|[\"']mlflow[\"']\s*,\s*[\"'](?:ui|server)[\"']"
    r"|[\"']prefect[\"']\s*,\s*[\"']server[\"']\s*,\s*[\"']start[\"'])"
)
LOCALHOST = re.compile(r"(--host|-h)[\s=\"',]+127\.0\.0\.1\b")
ANY_ADDRESS = "0.0.0." + "0"  # spelled out so this file does not match its own scan


def command_context(text: str, start: int) -> str:
    """The command line a match sits in, with backslash continuations and a Python call's
    argument list joined (up to the closing bracket or 400 characters)."""
    line_start, end = text.rfind("\n", 0, start) + 1, start
    while (nl := text.find("\n", end)) != -1 and text[end:nl].rstrip().endswith("\\"):
        end = nl + 1
    snippet = text[line_start : len(text) if nl == -1 else nl + 1]
    if "[" in text[line_start:start] or "(" in text[line_start:start]:
        snippet = text[line_start : start + 400]
        for closer in "])":
            idx = snippet.find(closer, start - line_start)
            if idx != -1:
                snippet = snippet[: idx + 1]
                break
    return snippet


def test_every_server_command_binds_localhost(record) -> None:
    names = ("README.md", "prefect.yaml", "Makefile", "pyproject.toml", "dvc.yaml")
    globs = ("scripts/*", "flows/*.py", "vae_core/*.py", "docs/*", ".github/*")
    found = [REPO_ROOT / n for n in names]
    found += [p for g in globs for p in (REPO_ROOT / g).parent.rglob(Path(g).name)]
    files = sorted({p for p in found if p.is_file() and "__pycache__" not in p.parts})
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
        f"scan of {len(files)} files (README, scripts/, flows/, vae_core/, docs/, CI) for "
        "`mlflow ui|server`, `prefect server start`, all-interfaces addresses",
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
    secret = re.compile(r"(password|passwd|secret|token|api[_-]?key|://[^/\s]+:[^@\s]+@)", re.I)
    lines = [line.strip() for line in text.splitlines() if not line.lstrip().startswith("#")]
    suspicious = [line for line in lines if secret.search(line)]
    from flows.params import KNOWN_KEYS

    secret_keys = [k for k in KNOWN_KEYS if re.search(r"password|secret|token|key$", k, re.I)]
    record(
        "security: params.yaml credentials",
        "params.yaml lines and the schema's keys searched for passwords, tokens, keys, "
        "user:pass@ URLs",
        f"suspicious lines: {suspicious or 'none'}; secret-like keys: {secret_keys or 'none'}",
    )
    assert suspicious == [] and secret_keys == []
