#!/usr/bin/env bash
# The device run (issues 23, 17, 11): one short script for a bare, offline machine with one GPU, whose python3
# holds torch but not the project nor pycocotools, fvcore, submitit or hotcoco. Within 6 minutes on one H100,
# set-up included, it brings back $OUT/gpu_check.json (rewritten after every step and every timed row), the log
# and a figure. docs/device.md gives the one `run` call and the estimate per step.
#
#   bash scripts/gpu_wheels.sh                          # HERE first: .whl/ (the wheels) and .whl/commit.txt
#   bash scripts/gpu_check.sh                           # there: CUDA, Table 1 at L 640
#   bash scripts/gpu_check.sh --device cpu --size tiny  # the rehearsal on a CPU (tests/test_gpu_rehearsal.py)
#   options: --device cuda|cpu, --size tiny|S|B|L|g, --no-compile, --compiled-rows a,b,...
#   environment: OUT (default gpu_check_out), SCRATCH (default /tmp/gpu_check_scratch: the installed wheels,
#   the project, the synthetic data; never $OUT), PYTHON (default python3: the machine's, no venv), WHEELS
#   (default .whl), BUDGET_S (default 360: the whole script, set-up included), GPU_CHECK_LIMIT_<step> (seconds:
#   that step's own limit instead of scripts/gpu_record.py's).
#
# Set-up, offline (PIP_NO_INDEX=1): the carried wheels and the project itself (no index, no dependencies, so
# that its `study.variants` entry points exist) go into $SCRATCH/site on PYTHONPATH. Then the steps of
# scripts/gpu_steps.py, cheapest and most wanted first, each under its own `timeout` (at most what is left of
# the budget): environment, table1_eager, sync_check, train, table1_compiled, figure. DDP is not run: one GPU
# ("not tested (1 GPU)" in the JSON).
# Exit status: 0 every step passed; 1 a step failed, timed out or was skipped; 2 bad option or a file in $OUT
# that this suite did not write; 3 no CUDA GPU (nvidia-smi lists none, or torch sees none); 4 $PYTHON cannot
# import torch; 5 the offline set-up failed (wheels, the project's install, or its entry points).
set -u -o pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
OUT="${OUT:-gpu_check_out}"
SCRATCH="${SCRATCH:-/tmp/gpu_check_scratch}"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
BUDGET_S="${BUDGET_S:-360}"
DEVICE=cuda
SIZE=L
COMPILE=1
COMPILED_ROWS=""
START=$(date +%s)

usage() {
    echo "usage: bash scripts/gpu_check.sh [--device cuda|cpu] [--size tiny|S|B|L|g] [--no-compile]" \
         "[--compiled-rows a,b,...]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
        --size) [ $# -ge 2 ] || usage; SIZE=$2; shift 2 ;;
        --compiled-rows) [ $# -ge 2 ] || usage; COMPILED_ROWS=$2; shift 2 ;;
        --no-compile) COMPILE=0; shift ;;
        *) echo "gpu_check: unknown option '$1'" >&2; usage ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got '$DEVICE'" >&2; usage ;; esac
case "$SIZE" in tiny|S|B|L|g) ;; *) echo "gpu_check: --size must be tiny, S, B, L or g, got '$SIZE'" >&2; usage ;; esac
IMG=640
[ "$SIZE" = tiny ] && IMG=64

no_gpu() {
    echo "gpu_check: no CUDA GPU on this machine ($1); nothing was run. Run scripts/gpu_check.sh on a machine with an NVIDIA GPU (or --device cpu for the rehearsal)." >&2
    exit 3
}

# ---- a GPU listed at all? (before anything is written)
NGPU=0
if [ "$DEVICE" = cuda ]; then
    command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    [ "${NGPU:-0}" -ge 1 ] || no_gpu "nvidia-smi lists no GPU"
fi

# ---- $OUT: the log, the JSON and the figure (and the manifest that says the suite wrote them), nothing else
for name in gpu_check.log gpu_check.json gpu_check.png; do
    if [ -e "$OUT/$name" ] && ! grep -qs "\"$name\"" "$OUT/.study-manifest.json"; then
        echo "gpu_check: $OUT/$name is a file that this suite did not write, and it is not replaced; move it away or set OUT to another folder" >&2
        exit 2
    fi
done
mkdir -p "$OUT" "$SCRATCH"
OUT=$(cd "$OUT" && pwd)
JSON="$OUT/gpu_check.json"
exec > >(tee "$OUT/gpu_check.log") 2>&1
export PYTHONUNBUFFERED=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 STUDY_PROGRESS=0
export STUDY_CACHE="$SCRATCH/cache" TORCHINDUCTOR_CACHE_DIR="$SCRATCH/inductor" MPLCONFIGDIR="$SCRATCH/mpl"
elapsed() { echo $(( $(date +%s) - START )); }
echo "gpu_check: device $DEVICE, size $SIZE at $IMG, budget ${BUDGET_S}s (set-up included), python $PY, scratch $SCRATCH"

# ---- set-up: torch importable, CUDA visible, the carried wheels and the project installed without the index
command -v "$PY" >/dev/null 2>&1 || { echo "gpu_check: no '$PY' on this machine (set PYTHON)" >&2; exit 4; }
"$PY" -c "import torch" || { echo "gpu_check: '$PY' cannot import torch (see above); nothing was run" >&2; exit 4; }
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || no_gpu "nvidia-smi lists $NGPU GPU(s) but torch.cuda.is_available() is False"
fi
setup_failed() { echo "gpu_check: offline set-up failed: $1" >&2; exit 5; }
SITE="$SCRATCH/site"
rm -rf "$SITE"
ls "$WHEELS"/*.whl >/dev/null 2>&1 || setup_failed "no wheels in $WHEELS (run bash scripts/gpu_wheels.sh here, then carry $WHEELS)"
# the wheels and the project itself (built by the machine's setuptools, so that its entry points exist), in one
# call: a second `pip install --target` into the same folder would skip what is there already. Built from a copy in
# $SCRATCH/src, so that the build writes no build/ or egg-info into the checkout.
SRC="$SCRATCH/src"
rm -rf "$SRC" && mkdir -p "$SRC" && cp -r "$REPO"/pyproject.toml "$REPO"/README.md "$REPO"/study "$REPO"/baselines \
    "$REPO"/analysis "$SRC"/ || setup_failed "could not copy the project into $SRC"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl "$SRC" || setup_failed "pip could not install the wheels of $WHEELS and the project into $SITE"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
(cd "$SCRATCH" && "$PY" - <<'EOF') || setup_failed "the installed project does not import or has no study.variants entry point"
from importlib.metadata import entry_points
# the project (first: it hides fvcore's torch.jit.script warning), every carried distribution, the modules using them
import study, baselines
import fvcore.nn, iopath, yacs, termcolor, pycocotools.mask, submitit, hotcoco
import study.bench.flops, study.data.coco, study.launch
eps = [e.name for e in entry_points(group="study.variants")]
assert eps, "no study.variants entry point"
print("set-up: study from", study.__file__, "| study.variants:", eps)
EOF
SETUP_S=$(elapsed)
GPUS=$NGPU
"$PY" scripts/gpu_record.py init --out "$OUT" --device "$DEVICE" --size "$SIZE" --img-size "$IMG" \
    --budget "$BUDGET_S" --gpus "$GPUS" --wheels "$WHEELS" || setup_failed "could not write $JSON"
"$PY" scripts/gpu_record.py record --out "$OUT" --step setup --verdict ok --seconds "$SETUP_S" --limit 0
echo "== setup: ok in ${SETUP_S}s"

# ---- the steps
FAILED=0
RESERVE=30  # seconds every step but the figure leaves to the figure and the last record
declare -A ESTIMATE LIMIT
while read -r name est lim; do ESTIMATE[$name]=$est; LIMIT[$name]=$lim; done \
    < <("$PY" scripts/gpu_record.py estimates)
echo "estimates on one H100 (not measurements; docs/device.md): setup ${ESTIMATE[setup]}s, $(for s in \
    environment table1_eager sync_check train table1_compiled figure; do printf '%s %ss, ' "$s" "${ESTIMATE[$s]}"; \
    done)"

# step NAME COMMAND...: run under `timeout` (its own limit, at most what is left of the budget), then record it
step() {
    local name=$1
    shift
    local left=$(( BUDGET_S - $(elapsed) - RESERVE )) limit=${LIMIT[$name]}
    if [ "$left" -lt 15 ]; then
        FAILED=1
        echo "== $name: SKIPPED (budget spent: ${left}s left)"
        "$PY" scripts/gpu_record.py record --out "$OUT" --step "$name" --verdict SKIPPED --seconds 0 --limit 0 \
            --detail="budget spent (${left}s left of ${BUDGET_S}s)"
        return 0
    fi
    [ "$left" -ge "$limit" ] || limit=$left
    echo "== $name (H100 estimate ${ESTIMATE[$name]}s, limit ${limit}s, ${left}s of the budget left)"
    local t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@"
    local rc=$? verdict=ok
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict=TIMEOUT; elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
    [ "$verdict" = ok ] || FAILED=1
    echo "== $name: $verdict in ${took}s"
    "$PY" scripts/gpu_record.py record --out "$OUT" --step "$name" --verdict "$verdict" --seconds "$took" \
        --limit "$limit"
}
skip() {
    echo "== $1: not run ($2)"
    "$PY" scripts/gpu_record.py record --out "$OUT" --step "$1" --verdict "not run" --seconds 0 --limit 0 --detail="$2"
}

COMMON=(--json "$JSON" --device "$DEVICE" --size "$SIZE" --img-size "$IMG" --scratch "$SCRATCH")
step environment "$PY" scripts/gpu_steps.py environment "${COMMON[@]}"
step table1_eager "$PY" scripts/gpu_steps.py table1_eager "${COMMON[@]}"
step sync_check "$PY" scripts/gpu_steps.py sync_check "${COMMON[@]}"
step train "$PY" scripts/gpu_steps.py train "${COMMON[@]}"
if [ "$COMPILE" = 1 ]; then
    step table1_compiled "$PY" scripts/gpu_steps.py table1_compiled "${COMMON[@]}" --compiled-rows "$COMPILED_ROWS"
else
    skip table1_compiled "--no-compile"
fi
RESERVE=5
step figure "$PY" scripts/gpu_record.py figure --out "$OUT"

"$PY" scripts/gpu_record.py finish --out "$OUT" || FAILED=1
echo
echo "gpu_check: $(elapsed)s in all; $JSON"
"$PY" - "$JSON" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
for s in r["steps"]:
    print(f"  {s['step']:<16} {s['verdict']:<14} {s['seconds']:>4}s (limit {s['limit_s']}s, H100 estimate {s['estimate_s_h100']}s)")
for key in ("table1_eager", "table1_compiled"):
    for row in r.get(key, {}).get("rows", []):
        if "error" in row:
            print(f"  {key:<16} {row['variant']:<22} FAILED: {row['error'][:80]}")
            continue
        paper = f"{row['paper_ratio']:.2f}x" if row.get("paper_ratio") else "-"
        ratio = f"{row['ratio']:.2f}x row 0" if row.get("ratio") is not None else "(no ratio: row 0 not timed)"
        print(f"  {key:<16} {row['variant']:<22} {row['fps']:9.2f} FPS  {ratio}  paper {paper}")
EOF
exit "$FAILED"
