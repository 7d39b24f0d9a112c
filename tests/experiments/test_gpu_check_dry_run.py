"""`bash scripts/gpu_check.sh --dry-run`: every step of the GPU check on the CPU at tiny sizes,
with mlflow, prefect, dvc, ruamel.yaml, filelock and mlxtend unimportable as on the GPU machine,
so a broken import or a missing file shows here rather than in that machine's few minutes."""

import math
import os
import re
import subprocess

import pytest
from helpers import REPO_ROOT

NOT_ON_THE_GPU_BOX = ("mlflow", "prefect", "dvc", "ruamel", "filelock", "mlxtend")
STEPS = ("env", "data", "tests", "bench", "eval-bench", "reproduce")
FIGURES = (
    "torch_threads", "cuda_available", "matmul_fp32_gflops", "matmul_bf16_gflops",
    "baseline_samples_per_second", "project_samples_per_second",
    "project_fraction_of_fp32_matmul", "project_fraction_of_bf16_matmul",
    "baseline_fraction_of_bf16_matmul", "time_to_target_speedup", "iwae_k5_n20_seconds",
    "iwae_k5_n20_nll_iwae", "seed_mlp_test_nll", "best_test_nll", "step_reproduce_seconds",
    "gpu_check_seconds",
)  # fmt: skip


@pytest.mark.slow  # 20 s on two idle cores
def test_every_step_runs_and_reports_its_figures_without_the_orchestration_packages(tmp_path):
    blocked = tmp_path / "blocked"
    for name in NOT_ON_THE_GPU_BOX:
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text('raise ImportError("not on the GPU box")\n')
    path = [str(blocked), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path), "OUT": str(tmp_path / "out")}
    cmd = ["bash", "scripts/gpu_check.sh", "--dry-run"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = done.stdout
    assert done.returncode == 0, out[-4000:] + done.stderr[-2000:]
    for step in STEPS:
        assert re.search(rf"^step {step} ok \(rc 0, [\d.]+ s\)$", out, re.MULTILINE), step
    lines = dict(line.split(" ", 1) for line in out.splitlines() if re.fullmatch(r"\w+ \S+", line))
    assert all(math.isfinite(float(lines[name])) for name in FIGURES), FIGURES
    assert "not logging to MLflow" in out  # and the reproduce step ran all the same
    assert (tmp_path / "out" / "gpu_check.log").read_text() == out
