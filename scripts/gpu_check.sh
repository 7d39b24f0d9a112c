#!/usr/bin/env bash
# The GPU check: one command, at most six minutes, on a bare CUDA machine. It needs python3 with
# torch, torchvision, numpy and pytest (no mlflow, prefect, dvc, git or network) and imports only
# vae_core and experiments. Steps, each with its own time limit, each run and reported even when
# an earlier one failed:
#   env         python, torch, CUDA and the device
#   data        the MNIST folder (--dry-run: writes a tiny synthetic one)
#   tests       its own torch-only test files (TEST_FILES below), named one by one (--dry-run:
#               the GPU tests' file only; the suite runs the import check itself)
#   bench       python3 -m experiments bench: the trainer against the design document's loop
#   eval-bench  python3 -m experiments eval-bench: IWAE timing, k=5000 on all 10,000 on CUDA
#   reproduce   python3 -m experiments reproduce: Burda's one-layer IWAE k=5 in what is left of
#               the six minutes (at most 2.5), k=5000 on all 10,000 test images, not logged
# Every figure is a `name value` line; the end is one line per step,
# `step NAME ok|failed (rc N, S s)`, and the exit status is 1 when a step failed. With $OUT set
# the whole output is also written to $OUT/gpu_check.log.
#
# Usage:
#   bash scripts/gpu_check.sh --fetch-data      # here, once: ../shared/data/mnist -> .gpu-data/mnist
#                                               # (git-ignored; carry it with the working tree)
#   bash scripts/gpu_check.sh [MNIST_DIR]       # on the GPU machine (default .gpu-data/mnist)
#   bash scripts/gpu_check.sh --dry-run [MNIST_DIR]
#       the same steps on the CPU at tiny sizes, on a tiny synthetic MNIST in a temporary folder
#       unless MNIST_DIR is given; well under a minute (tests/experiments runs it)
set -uo pipefail
cd "$(dirname "$0")/.."

DATA_DIR=.gpu-data/mnist
SHARED_MNIST=../shared/data/mnist
TEST_FILES=(tests/vae_core/test_gpu.py tests/test_import_isolation.py)
TOTAL_S=360                              # the whole check
REPRODUCE_MAX_S=150                      # reproduce's budget, when that much is left
REPRODUCE_ROWS=burda1_iwae5              # Burda et al.: 85.54 nats after 3,280 epochs

usage() { sed -n '2,/^set -uo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

dry_run=0
mnist_dir=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) dry_run=1 ;;
    --fetch-data)
      mkdir -p "$DATA_DIR" && cp -f "$SHARED_MNIST"/*-ubyte.gz "$DATA_DIR"/ &&
        chmod u+w "$DATA_DIR"/* && ls -l "$DATA_DIR"
      exit $? ;;
    -h | --help) usage; exit 0 ;;
    -*) echo "unknown option $1" >&2; usage >&2; exit 2 ;;
    *) mnist_dir=$1 ;;
  esac
  shift
done

py=.venv/bin/python
[ -x "$py" ] || py=python3
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
# The GPU machine has pytest alone: no plugins here either (pytest-randomly, pytest-timeout).
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
started_ms=$(now_ms)
summary=()
failed=0

# step NAME LIMIT_S COMMAND...: run it under `timeout`, print its status, remember the summary.
step() {
  local name=$1 limit=$2
  shift 2
  local cmd="$*"
  echo "== step $name (limit ${limit} s): ${cmd%%$'\n'*}"
  local t0 rc took
  t0=$(now_ms)
  timeout --kill-after=5 "$limit" "$@"
  rc=$?
  took=$(awk -v ms=$(($(now_ms) - t0)) 'BEGIN { printf "%.1f", ms / 1000 }')
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && echo "== step $name: stopped by its ${limit} s limit"
  echo "== step $name: rc $rc, $took s"
  echo "step_${name//-/_}_seconds $took"
  local verdict=ok
  [ "$rc" -eq 0 ] || { verdict=failed; failed=1; }
  summary+=("step $name $verdict (rc $rc, $took s)")
  return "$rc"
}

seconds_left() { echo $((TOTAL_S - ($(now_ms) - started_ms) / 1000)); }

ENV_REPORT='import os, platform, torch
print("python_version", platform.python_version())
print("torch_version", torch.__version__)
print("torch_threads", torch.get_num_threads())
print("cpu_count", os.cpu_count())
print("cuda_available", int(torch.cuda.is_available()))
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    print("cuda_version", torch.version.cuda)
    print("device_name", props.name.replace(" ", "_"))
    print("device_memory_gib", round(props.total_memory / 2**30, 1))
    print("bf16_supported", int(torch.cuda.is_bf16_supported()))
'
CHECK_DATA='import sys
from vae_core.data import locate_raw_files
for key, path in locate_raw_files(sys.argv[1]).items():
    print(f"mnist_{key}_bytes", path.stat().st_size)
'
FETCH_HINT="run 'bash scripts/gpu_check.sh --fetch-data' where $SHARED_MNIST exists, or:
  mkdir -p $DATA_DIR && cp $SHARED_MNIST/*-ubyte.gz $DATA_DIR/ (then carry $DATA_DIR along)"

main() {
  echo "gpu_check mode $([ $dry_run -eq 1 ] && echo dry-run || echo gpu), python $py"
  command -v nvidia-smi >/dev/null &&
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  step env 30 "$py" -c "$ENV_REPORT"
  if [ $dry_run -eq 1 ]; then
    local device=cpu
    if [ -z "$mnist_dir" ]; then
      mnist_dir=$tmp/mnist
      step data 30 "$py" -m experiments make-tiny-mnist "$mnist_dir" --train 2000 --test 200
    else
      step data 30 "$py" -c "$CHECK_DATA" "$mnist_dir"
    fi
    local bench=(--reference-epochs 2 --max-epochs 1 --throughput-epochs 2 --matmul-size 256)
    local eval_bench=(--train-epochs 1 --ks 5 --test-size 20)
    local reproduce=(--rows seed_mlp --max-epochs 1 --test-k 10 --test-size 50 --val-size 100)
    local reproduce_max_s=30
    local tests=("${TEST_FILES[0]}")
  else
    local device=cuda
    mnist_dir=${mnist_dir:-$DATA_DIR}
    step data 30 "$py" -c "$CHECK_DATA" "$mnist_dir" || echo "no MNIST at $mnist_dir: $FETCH_HINT"
    # Batch 4096: a batch-128 MLP step is launch-bound on a GPU (the bench also prints the
    # batch-128 rate); the compiled-loss test compiles with Inductor, hence the tests' limit.
    local bench=(--reference-epochs 2 --max-epochs 20 --batch-size 4096)
    local tests_s=110
    local tests=("${TEST_FILES[@]}")
    local eval_bench=(--train-epochs 5)
    local reproduce=(--rows "$REPRODUCE_ROWS")
    local reproduce_max_s=$REPRODUCE_MAX_S
  fi
  step tests "${tests_s:-75}" "$py" -m pytest -q -p no:cacheprovider "${tests[@]}"
  step bench 75 "$py" -m experiments bench --mnist-dir "$mnist_dir" --device $device "${bench[@]}"
  step eval-bench 50 "$py" -m experiments eval-bench --mnist-dir "$mnist_dir" --device $device \
    "${eval_bench[@]}"
  # What is left of the whole, less the time to start and stop; at most reproduce_max_s.
  local budget_s=$(($(seconds_left) - 20))
  [ "$budget_s" -le "$reproduce_max_s" ] || budget_s=$reproduce_max_s
  [ "$budget_s" -ge 10 ] || budget_s=10
  echo "reproduce_budget_seconds $budget_s"
  step reproduce $((budget_s + 15)) env -u MLFLOW_TRACKING_URI "$py" -m experiments reproduce \
    --mnist-dir "$mnist_dir" --device $device --out "$tmp/reproduce" \
    --budget-minutes "$(awk -v s="$budget_s" 'BEGIN { print s / 60 }')" "${reproduce[@]}"
  echo "gpu_check_seconds $(awk -v ms=$(($(now_ms) - started_ms)) 'BEGIN { printf "%.1f", ms / 1000 }')"
  printf '%s\n' "${summary[@]}"
  return $failed
}

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  main 2>&1 | tee "$OUT/gpu_check.log"
  exit "${PIPESTATUS[0]}"
fi
main
