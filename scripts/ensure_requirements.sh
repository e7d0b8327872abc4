# Sourced by the scripts: installs requirements.txt into the current Python when any
# listed package is missing (PYTHON overrides the interpreter).
PY=${PYTHON:-python3}
if ! "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as md, re
from pathlib import Path
for line in Path("requirements.txt").read_text().splitlines():
    name = re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0]
    if name and not name.startswith("#"):
        md.version(name)
PYEOF
then
    echo "[$(basename "$0")] installing requirements.txt into $("$PY" -c 'import sys; print(sys.prefix)') ..."
    "$PY" -m pip install -q -r requirements.txt
fi
