#!/usr/bin/env bash
# One-command GPU check: on any CUDA machine, prints the benchmark figures and runs the tests
# marked `gpu`. Usage: bash scripts/gpu_check.sh [MNIST_DIR]
# MNIST_DIR holds the four official IDX .gz files (default: ../shared/data/mnist, or
# ./.gpu-data/mnist when the folder was carried to a device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
mnist_dir=${1:-}
if [ -z "$mnist_dir" ]; then
  for candidate in .gpu-data/mnist ../shared/data/mnist; do
    [ -d "$candidate" ] && mnist_dir=$candidate && break
  done
fi
py=.venv/bin/python
[ -x "$py" ] || py=python3
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
echo "== tests marked gpu"
$py -m pytest -m gpu -q -p no:cacheprovider tests
if [ -n "$mnist_dir" ]; then
  echo "== vae-pipeline bench --device cuda (full MNIST from $mnist_dir)"
  $py -m flows.cli bench --mnist-dir "$mnist_dir" --device cuda
  echo "== IWAE evaluation timing"
  $py scripts/bench_eval.py --mnist-dir "$mnist_dir" --train-epochs 10 --device cuda
  echo "== vae-pipeline reproduce, short (k=5000 on all 10,000 test images per row)"
  MLFLOW_TRACKING_URI=sqlite:///$(mktemp -d)/mlflow.db \
    $py -m flows.cli reproduce --mnist-dir "$mnist_dir" --budget-minutes 4 --device cuda \
    --rows seed_mlp,burda1_vae --out "$(mktemp -d)"
else
  echo "no MNIST folder given: benchmark skipped (pass MNIST_DIR)" >&2
fi
