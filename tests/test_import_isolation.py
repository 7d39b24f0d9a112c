"""vae_core must run on a bare GPU box: importing all of it pulls in no orchestration code."""

import subprocess
import sys

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
