"""vae_core must run on a bare GPU box: importing all of it pulls in no orchestration code."""

import ast
import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib, pkgutil, sys
import vae_core
names = [m.name for m in pkgutil.walk_packages(vae_core.__path__, "vae_core.")]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"prefect", "mlflow", "dvc"})
print(len(names), leaked)
assert not leaked, leaked
"""


def test_vae_core_imports_no_orchestration_packages():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    modules, _ = out.stdout.split(" ", 1)
    assert int(modules) >= 10  # the walk really visited the subpackages' modules


def _project_imports(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (function-level imports
    too: a cycle hidden inside a function is still a cycle)."""
    modules = {}
    for path in sorted(root.glob("[fv][la]*/**/*.py")):
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
    assert {"flows.cli", "flows.pipeline", "vae_core.config"} <= set(graph)
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
    """The library's layers point one way: evaluation may load models through training, but
    training (the trainer's IWAE validation included) reaches nothing of evaluation, directly
    or through another module, at the top or inside a function."""
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
