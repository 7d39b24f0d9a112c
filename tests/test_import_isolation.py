"""vae_core and experiments must run on a bare GPU box: importing all of either pulls in no
orchestration code, nor anything else that machine lacks (ruamel.yaml, filelock, mlxtend)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import importlib, pkgutil, sys
NOT_ON_THE_GPU_BOX = {"prefect", "mlflow", "dvc", "ruamel", "filelock", "mlxtend", "flows"}
package = importlib.import_module(sys.argv[1])
names = [m.name for m in pkgutil.walk_packages(package.__path__, sys.argv[1] + ".")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in NOT_ON_THE_GPU_BOX)
print(len(names), leaked)
assert not leaked, leaked
"""


@pytest.mark.parametrize(("package", "modules_at_least"), [("vae_core", 10), ("experiments", 6)])
def test_imports_no_orchestration_packages(package: str, modules_at_least: int) -> None:
    cmd = [sys.executable, "-c", CHECK, package]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    modules, _ = out.stdout.split(" ", 1)
    assert int(modules) >= modules_at_least  # the walk really visited the package's modules


def _project_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (function-level imports
    too: a cycle hidden inside a function is still a cycle)."""
    modules = {}
    for path in sorted(
        p for pkg in ("experiments", "flows", "vae_core") for p in root.glob(f"{pkg}/**/*.py")
    ):
        rel = path.relative_to(root).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        modules[".".join(parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_cycles_between_project_modules():
    root = Path(__file__).resolve().parents[1]
    graph = _project_imports(root)
    assert {"flows.cli", "flows.pipeline", "vae_core.config", "experiments.cli"} <= set(graph)
    # A depth-first search that reports the first back edge it meets.
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack, node, nxt]
            if nxt not in state and (cycle := visit(nxt, [*stack, node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_training_never_imports_evaluation():
    """Evaluation may load models through training, but training (its IWAE validation included)
    reaches nothing of evaluation, directly or not, at the top or inside a function."""
    graph = _project_imports(Path(__file__).resolve().parents[1])
    training = sorted(m for m in graph if m.split(".")[:2] == ["vae_core", "training"])
    assert "vae_core.training.trainer" in training
    reached: dict[str, str] = {}  # module -> the training module whose imports reach it
    todo = [(m, m) for m in training]
    while todo:
        module, origin = todo.pop()
        for nxt in graph[module]:
            if nxt not in reached:
                reached[nxt] = origin
                todo.append((nxt, origin))
    leaks = {m: o for m, o in reached.items() if m.split(".")[:2] == ["vae_core", "evaluation"]}
    assert not leaks, f"vae_core.training reaches vae_core.evaluation: {leaks}"
    assert "vae_core.estimators" in reached  # the shared IWAE estimator, below both
