#!/usr/bin/env bash
# Installs what is missing into the current Python, then runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, re, sys
from pathlib import Path
for line in Path("requirements.txt").read_text().splitlines():
    name = re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0]
    if name and not name.startswith("#"):
        md.version(name)
PYEOF
then
    echo "[test.sh] installing requirements.txt ..."
    "$PY" -m pip install -q -r requirements.txt
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
exec "$PY" -m pytest -q tests "$@"
