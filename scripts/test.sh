#!/usr/bin/env bash
# Installs what is missing into the current Python, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure_requirements.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m pytest -q tests "$@"
