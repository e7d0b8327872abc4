# Sourced by the scripts: installs requirements.txt into the current Python when any
# listed package is missing or outside its range (PYTHON overrides the interpreter).
PY=${PYTHON:-python3}
if ! "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
for line in Path("requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line:
        req = Requirement(line)
        if not req.specifier.contains(md.version(req.name), prereleases=True):
            raise SystemExit(f"{req.name} {md.version(req.name)} is outside {req.specifier}")
PYEOF
then
    echo "[$(basename "$0")] installing requirements.txt into $("$PY" -c 'import sys; print(sys.prefix)') ..."
    "$PY" -m pip install -q -r requirements.txt
fi
