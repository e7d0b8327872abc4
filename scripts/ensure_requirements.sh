# Sourced by the scripts: installs the lines of requirements.txt whose package is missing
# or outside its range into the current Python (PYTHON overrides the interpreter). A
# requirement of opencv-python-headless is met by any OpenCV build in range (opencv-python,
# the contrib ones): installing the headless one beside another would make two packages
# own cv2.
PY=${PYTHON:-python3}
if ! to_install=$("$PY" - <<'PYEOF'
import importlib.metadata as md
from pathlib import Path
try:
    from packaging.requirements import Requirement
except ImportError:  # pip carries its own copy
    from pip._vendor.packaging.requirements import Requirement
SAME_MODULE = {"opencv-python-headless": ("opencv-python-headless", "opencv-python",
                                          "opencv-contrib-python-headless",
                                          "opencv-contrib-python")}


def met(req: Requirement) -> bool:
    for name in SAME_MODULE.get(req.name.lower(), (req.name,)):
        try:
            if req.specifier.contains(md.version(name), prereleases=True):
                return True
        except md.PackageNotFoundError:
            pass
    return False


for line in Path("requirements.txt").read_text().splitlines():
    line = line.split("#")[0].strip()
    if line and not met(Requirement(line)):
        print(line)
PYEOF
); then
    echo "[$(basename "$0")] could not check requirements.txt with $PY (above); install it" \
         "yourself: $PY -m pip install -r requirements.txt" >&2
    exit 1
fi
reqs=()
while read -r req_line; do  # read trims the spaces around a line
    if [ -n "$req_line" ]; then reqs+=("$req_line"); fi
done <<< "$to_install"
if [ ${#reqs[@]} -gt 0 ]; then
    req_prefix=$("$PY" -c 'import sys; print(sys.prefix)')
    echo "[$(basename "$0")] installing ${reqs[*]} into $req_prefix ..."
    "$PY" -m pip install -q "${reqs[@]}"
fi
