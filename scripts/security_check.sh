#!/usr/bin/env bash
# Security checks in one command (no network needed): the security tests of the reliability
# suite (every torch.load weights-only, pickle payloads refused by every loader, pickle-based
# MLflow models only with an explicit opt-in, servers bound to 127.0.0.1, README guidance,
# no credentials in params.yaml), then bandit and pip-audit when they are installed.
# Usage: bash scripts/security_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
[ -x "$py" ] || py=python3
export DVC_NO_ANALYTICS=1 PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 MLFLOW_ENABLE_TELEMETRY=false
status=0
echo "== security tests (tests/reliability/test_security.py)"
$py -m pytest -q -p no:cacheprovider tests/reliability/test_security.py || status=1
if $py -m bandit --version >/dev/null 2>&1; then
  echo "== bandit (medium severity and above)"
  $py -m bandit -q -r flows vae_core scripts -ll || status=1
else
  echo "== bandit not installed: skipped"
fi
if $py -m pip_audit --version >/dev/null 2>&1; then
  echo "== pip-audit (needs the network to fetch advisories)"
  $py -m pip_audit || status=1
else
  echo "== pip-audit not installed: skipped"
fi
exit $status
