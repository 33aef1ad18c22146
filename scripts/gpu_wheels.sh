#!/usr/bin/env bash
# Fill the ignored folder .whl/ with the wheels that the offline device machine lacks (issue 23), and record the
# commit they go with; run it HERE (where the package index works) before every device run.
#
#   bash scripts/gpu_wheels.sh                        # cp312 manylinux x86_64 wheels in .whl/ (the device's Python)
#   bash scripts/gpu_wheels.sh --python-version 3.11 --dest DIR   # the same set for another Python (the rehearsal)
#
# The set: pycocotools, submitit, hotcoco, fvcore with iopath, yacs and termcolor (fvcore and iopath exist only as
# sdists: built here with `pip wheel --no-deps`, pure-Python wheels). Every other requirement must be on the
# device already (scripts/gpu_device_packages.txt); a wheel requiring anything else stops the script. One version
# each (two would stop the device's install), pinned to what .venv tests here. Cached: a folder whose stamp names
# the same set and Python is kept. Always rewritten: DEST/commit.txt (HEAD and whether the tree differs from it),
# which gpu_check.sh records (scripts/gpu_record.py read_commit), since .git does not travel. Prints the total size; refuses more than
# LIMIT_MIB (default 32; the device tool carries 64 MiB in all, the working tree included).
set -eu -o pipefail

cd "$(dirname "$0")/.."
PYVER=3.12
DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-32}
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
    case "$1" in
        --python-version) PYVER=$2; shift 2 ;;
        --dest) DEST=$2; shift 2 ;;
        *) echo "gpu_wheels: unknown option '$1' (--python-version X.Y, --dest DIR)" >&2; exit 2 ;;
    esac
done

# binary wheels (name==version), then the sdist-only ones built here
BINARY="pycocotools==2.0.11 submitit==1.5.4 hotcoco==1.3.0 yacs==0.1.8 termcolor==3.3.0"
SDIST="iopath==0.1.10 fvcore==0.1.5.post20221221"
STAMP_TEXT="python $PYVER: $BINARY $SDIST"

mkdir -p "$DEST"
if [ -f "$DEST/stamp.txt" ] && [ "$(cat "$DEST/stamp.txt")" = "$STAMP_TEXT" ]; then
    echo "gpu_wheels: $DEST is up to date ($STAMP_TEXT)"
else
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    abi=cp${PYVER/./}
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
             manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    # shellcheck disable=SC2086
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --abi "$abi" --abi abi3 --abi none "${platforms[@]}" -d "$tmp" $BINARY
    # shellcheck disable=SC2086
    "$PY" -m pip wheel -q --no-deps --no-binary :all: -w "$tmp" $SDIST
    rm -f "$DEST"/*.whl "$DEST/stamp.txt"
    mv "$tmp"/*.whl "$DEST"/
    echo "$STAMP_TEXT" >"$DEST/stamp.txt"
fi

# every wheel's requirements (extras left out, markers read for the target Python) are on the device or carried
"$PY" - "$DEST" "$PYVER" scripts/gpu_device_packages.txt <<'EOF'
import re, sys, zipfile
from pathlib import Path

dest, pyver, listing = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
device = {norm(line.strip()) for line in listing.read_text().splitlines() if line.strip() and not line.startswith("#")}
wheels = sorted(dest.glob("*.whl"))
carried = {norm(w.name.split("-")[0]): w.name for w in wheels}
if len(carried) != len(wheels):
    sys.exit(f"gpu_wheels: two versions of one distribution in {dest}: {[w.name for w in wheels]}")
env = {"python_version": pyver, "python_full_version": pyver + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        name = norm(re.match(r"[A-Za-z0-9._-]+", req).group(0))
        marker = req.split(";", 1)[1].strip() if ";" in req else ""
        if marker:
            if "extra" in marker:
                continue
            from packaging.markers import Marker
            if not Marker(marker).evaluate(env):
                continue
        if name not in device and name not in carried:
            missing.append(f"{w.name} requires {req}")
if missing:
    sys.exit("gpu_wheels: requirements neither on the device (scripts/gpu_device_packages.txt) nor carried:\n  "
             + "\n  ".join(missing))
print(f"gpu_wheels: {len(wheels)} wheels, every requirement on the device or carried: "
      + ", ".join(w.name for w in wheels))
EOF

# the commit these files go with (.git does not travel to the device)
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
dirty=false
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || dirty=true
printf 'commit %s\ndirty %s\nwritten %s\n' "$commit" "$dirty" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$DEST/commit.txt"

kib=$(du -sk "$DEST" | cut -f1)
echo "gpu_wheels: $DEST holds $(( kib / 1024 )).$(( (kib % 1024) * 10 / 1024 )) MiB (limit $LIMIT_MIB MiB); commit $commit (dirty: $dirty)"
[ "$kib" -le $(( LIMIT_MIB * 1024 )) ] || { echo "gpu_wheels: $DEST is over $LIMIT_MIB MiB" >&2; exit 1; }
