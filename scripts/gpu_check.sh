#!/usr/bin/env bash
# The first-GPU-run check (issues 17 and 11): one short script for a machine with a GPU, in under ~8 minutes on
# one H100.
#
#   bash scripts/gpu_check.sh                           # CUDA, size L; logs + gpu_check.json in ${OUT:-gpu_check_out}/
#   bash scripts/gpu_check.sh --device cpu --size tiny  # the CPU fallback (what the tests run; no GPU needed)
#   options: --device cuda|cpu, --size tiny|S|B|L|g (the bench and DDP model size), --no-compile
#
# It installs nothing beyond `make install` (skipped with --device cpu when .venv exists), then, each step under
# its own `timeout`:
#   1. nvidia-smi, torch / CUDA / cuDNN versions, the GPUs torch sees;
#   2. the GPU-relevant tests (device resolution, speed protocol, host syncs, backbones);
#   3. zero host syncs on the GPU itself: torch.cuda.set_sync_debug_mode("error") around the forward of tiny
#      EoMT (masked and unmasked) and of row 0 (vit_adapter_m2f);
#   4. a few-step tiny EoMT training on cuda with bf16 autocast and torch.compile;
#   5. `study bench`: the six Table 1 rows at SIZE 640 (tiny: 64) in bf16, compiled and eager, all twelve rows
#      timed in the same interleaved rounds (study/bench/speed.py): FPS from the median, p5/p95, ratios to row 0
#      with bootstrap intervals, the per-component breakdown from the eager rows' own timed iterations, the SDPA
#      kernel taken and the environment in every row;
#   6. a few training steps of EoMT-SIZE at 640 on all GPUs with DDP (torchrun, one process per GPU; on the
#      CPU two gloo processes), each rank's peak memory;
#   7. with 2 GPUs or more: a 2-GPU submitit local job (`study launch --cluster local`), a few steps.
# Steps 1 (nvidia-smi), 2-4 and 7 need CUDA and are left out with --device cpu. Every step's output goes to
# $OUT/<step>.log; a summary of pass/fail per step ends the run, and $OUT/gpu_check.json gathers the steps, the
# versions, the bench rows and the DDP peak memory. After the install, all steps share a budget of BUDGET_S
# seconds (default 450): a step gets at most what is left, and steps that find less than 20 s left are skipped
# (and count as failed). Exit status: 0 all passed, 1 some step failed or was skipped, 2 bad option, 3 no CUDA
# GPU here (nothing is run).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PY=.venv/bin/python
STUDY=.venv/bin/study
NO_GPU=3
DEVICE=cuda
SIZE=L
COMPILE=1

usage() {
    echo "usage: bash scripts/gpu_check.sh [--device cuda|cpu] [--size tiny|S|B|L|g] [--no-compile]" >&2
    exit 2
}
while [ $# -gt 0 ]; do
    case "$1" in
        --device) [ $# -ge 2 ] || usage; DEVICE=$2; shift 2 ;;
        --size) [ $# -ge 2 ] || usage; SIZE=$2; shift 2 ;;
        --no-compile) COMPILE=0; shift ;;
        *) echo "gpu_check: unknown option '$1'" >&2; usage ;;
    esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu_check: --device must be cuda or cpu, got '$DEVICE'" >&2; usage ;; esac
case "$SIZE" in tiny|S|B|L|g) ;; *) echo "gpu_check: --size must be tiny, S, B, L or g, got '$SIZE'" >&2; usage ;; esac
IMG=640
[ "$SIZE" = tiny ] && IMG=64

no_gpu() {
    echo "gpu_check: no CUDA GPU on this machine ($1); nothing was run. Run scripts/gpu_check.sh on a machine with an NVIDIA GPU (or --device cpu for the CPU fallback)." >&2
    exit "$NO_GPU"
}

# ---- 0. a GPU at all? (before anything is installed)
NGPU=0
if [ "$DEVICE" = cuda ]; then
    command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
    NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
    [ "${NGPU:-0}" -ge 1 ] || no_gpu "nvidia-smi lists no GPU"
fi

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export GPU_CHECK_OUT="$OUT"
SUMMARY="$OUT/summary.txt"
STEPS="$OUT/steps.tsv"  # name, verdict, seconds: read into gpu_check.json
: >"$SUMMARY"
: >"$STEPS"
FAILED=0
START=$(date +%s)
DEADLINE=""  # set after the install

# step NAME SECONDS COMMAND...: run COMMAND under `timeout` (at most what is left of the budget), log to
# $OUT/NAME.log, record the outcome
step() {
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    if [ -n "$DEADLINE" ]; then
        local left=$(( DEADLINE - t0 ))
        if [ "$left" -lt 20 ]; then
            FAILED=1
            printf '%-26s %s\n' "$name" "SKIPPED (budget spent)" | tee -a "$SUMMARY"
            printf '%s\t%s\t%s\n' "$name" "SKIPPED" 0 >>"$STEPS"
            return 0
        fi
        [ "$left" -ge "$limit" ] || limit=$left
    fi
    echo "== $name (limit ${limit}s)"
    timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    local verdict=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="TIMEOUT"; elif [ "$rc" -ne 0 ]; then verdict="FAILED rc=$rc"; fi
    [ "$verdict" = ok ] || FAILED=1
    printf '%-26s %-14s %4ss  %s\n' "$name" "$verdict" "$took" "$OUT/$name.log" | tee -a "$SUMMARY"
    printf '%s\t%s\t%s\n' "$name" "$verdict" "$took" >>"$STEPS"
    [ "$verdict" = ok ] || tail -n 15 "$OUT/$name.log" | sed 's/^/    | /'
    return 0
}

if [ "$DEVICE" = cpu ] && [ -x "$PY" ]; then
    echo "== install: skipped (--device cpu and $PY exists)"
else
    step install 240 make install
fi
[ -x "$PY" ] || { echo "gpu_check: make install did not create $PY; see $OUT/install.log" >&2; exit 1; }
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || no_gpu "nvidia-smi lists $NGPU GPU(s) but torch.cuda.is_available() is False"
fi
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-450} ))

# ---- 1. the machine
[ "$DEVICE" = cuda ] && step nvidia_smi 30 nvidia-smi
step versions 60 "$PY" - <<'EOF'
import json, os, torch, timm
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), 'timm', timm.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.0f} GiB', f'sm_{p.major}{p.minor}')
if torch.cuda.is_available():
    print('SDPA enabled: flash', torch.backends.cuda.flash_sdp_enabled(), 'mem_efficient',
          torch.backends.cuda.mem_efficient_sdp_enabled(), 'cudnn', torch.backends.cuda.cudnn_sdp_enabled(), 'math',
          torch.backends.cuda.math_sdp_enabled())
versions = {'torch': torch.__version__, 'cuda': torch.version.cuda, 'cudnn': torch.backends.cudnn.version(),
            'timm': timm.__version__, 'gpus': [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
with open(os.path.join(os.environ['GPU_CHECK_OUT'], 'versions.json'), 'w') as f:
    json.dump(versions, f)
EOF

if [ "$DEVICE" = cuda ]; then
# ---- 2. the tests that touch device placement, timing and the forward's syncs
step tests 120 "$PY" -m pytest -q -x tests/test_device.py tests/test_speed.py tests/test_host_syncs.py \
    tests/test_backbone.py

# ---- 3. no host sync in the forward, on the GPU itself
step cuda_sync_debug 90 "$PY" - <<'EOF'
import torch
from study.models.build import build_model
from study.models.config import ModelConfig

small = dict(hidden_dim=32, encoder_layers=2, encoder_heads=4, encoder_ffn=48, decoder_heads=4, decoder_ffn=48,
             conv_inplane=32)
for variant, mode in (("eomt", "eval"), ("eomt_masked", "eval"), ("eomt", "train"), ("vit_adapter_m2f", "eval")):
    cfg = ModelConfig(variant=variant, size="tiny", img_size=64, num_classes=3, num_queries=5,
                      baseline=dict(small) if variant == "vit_adapter_m2f" else {})
    model = build_model(cfg).cuda().train(mode == "train")
    if mode == "train":
        model.set_mask_probs([0.5] * model.num_masked_layers)
    x = torch.rand(1, 3, 64, 64, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)  # first call: per-shape constants are built and cached
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    print(f"{variant} {mode}: no host sync in the forward")
EOF

# ---- 4. a few training steps on cuda, bf16 autocast, torch.compile
step train_cuda_bf16_compile 120 "$STUDY" train experiments/quickstart.yaml --run-dir "$OUT/train_tiny" \
    --set train.max_steps=8 --set train.checkpoint_every=4 --set train.device=cuda --set train.precision=bf16 \
    --set train.compile=true --set train.tensorboard=false
fi  # the CUDA-only steps 2-4

# ---- 5. the six Table 1 rows at SIZE 640: bf16, compiled and eager, in the same interleaved rounds
ROWS=vit_adapter_m2f,sfp_m2f,sfp_no_pixel_decoder,single_scale,eomt_masked,eomt
if [ "$COMPILE" = 1 ]; then MODES=compile+bf16,bf16; else MODES=bf16; fi
if [ "$DEVICE" = cuda ]; then ROUNDS=(--warmup 10 --iters 50); else ROUNDS=(--warmup 1 --iters 3); fi
step bench_table1 300 "$STUDY" bench --variants "$ROWS" --sizes "$SIZE" --img-size "$IMG" --device "$DEVICE" \
    --modes "$MODES" --reference vit_adapter_m2f:bf16 "${ROUNDS[@]}" --json "$OUT/bench_table1.json"

# ---- 6. DDP: a few training steps of EoMT-SIZE on every GPU (CPU: two gloo processes), peak memory per rank
if [ "$DEVICE" = cuda ]; then NPROC=$NGPU; PREC=bf16; else NPROC=2; PREC=fp32; fi
cat >"$OUT/ddp_train.py" <<'EOF'
"""One rank of gpu_check's DDP step: `study train` for a few steps, then this rank's peak memory as JSON."""
import json, os, resource, sys

import torch

from study.cli import main

rc = main(sys.argv[1:])
rank = int(os.environ.get("RANK", "0"))
peak = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "rc": rc,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
if torch.cuda.is_available() and torch.cuda.is_initialized():
    peak["peak_cuda_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    peak["peak_cuda_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    peak["gpu"] = torch.cuda.get_device_name()
with open(os.path.join(os.environ["GPU_CHECK_OUT"], f"ddp_peak_rank{rank}.json"), "w") as f:
    json.dump(peak, f)
sys.exit(rc)
EOF
step train_ddp 150 env -u WORLD_SIZE -u RANK -u LOCAL_RANK "$PY" -m torch.distributed.run --standalone \
    --nproc_per_node="$NPROC" "$OUT/ddp_train.py" train experiments/quickstart.yaml --run-dir "$OUT/train_ddp" \
    --set model.size="$SIZE" --set model.img_size="$IMG" --set train.max_steps=4 --set train.checkpoint_every=4 \
    --set train.batch_size=$(( 2 * NPROC )) --set data.batch_size=2 --set train.device="$DEVICE" \
    --set train.precision="$PREC" \
    --set train.tensorboard=false

# ---- 7. two GPUs: a submitit local job, a few steps
if [ "$NGPU" -ge 2 ]; then
    step launch_local_2gpu 120 "$STUDY" launch experiments/quickstart_grid.yaml --cluster local --steps train \
        --wait --set output_dir="$OUT/launch_local" --set launch.gpus_per_node=2 --set train.max_steps=6 \
        --set train.checkpoint_every=3 --set train.tensorboard=false
elif [ "$DEVICE" = cuda ]; then
    echo "launch_local_2gpu: skipped (1 GPU)" | tee -a "$SUMMARY"
fi

# ---- one JSON: the steps, the versions, the bench rows (figures and environment), the DDP peak memory
"$PY" - "$DEVICE" "$SIZE" "$IMG" "$(( $(date +%s) - START ))" <<'EOF' || FAILED=1
import glob, json, os, sys

out = os.environ["GPU_CHECK_OUT"]
device, size, img, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


steps = []
with open(os.path.join(out, "steps.tsv")) as f:
    for line in f:
        name, verdict, took = line.rstrip("\n").split("\t")
        steps.append({"step": name, "verdict": verdict, "seconds": int(took)})
keep = ("variant", "size", "img_size", "mode", "params", "gflops", "fps", "ms_median", "ms_mean", "ms_p5", "ms_p95",
        "n_iters", "ratio", "ratio_ci", "ratio_to", "rank_warning", "breakdown_ms", "breakdown_of",
        "attention_kernels", "limit_ms", "limit_ratio", "limit_ratio_ci", "limit_rate_gflops", "limit_probe",
        "limit_note", "env", "protocol")
bench = [{k: r.get(k) for k in keep} for r in load(os.path.join(out, "bench_table1.json")) or []]
ddp = sorted((load(p) or {} for p in glob.glob(os.path.join(out, "ddp_peak_rank*.json"))),
             key=lambda r: r.get("rank", -1))
report = {"device": device, "size": size, "img_size": img, "seconds": seconds,
          "passed": all(s["verdict"] == "ok" for s in steps), "steps": steps,
          "versions": load(os.path.join(out, "versions.json")), "bench_table1": bench, "train_ddp": ddp}
with open(os.path.join(out, "gpu_check.json"), "w") as f:
    json.dump(report, f, indent=1)
print(f"wrote {os.path.join(out, 'gpu_check.json')}")
EOF

echo
echo "gpu_check: $(( $(date +%s) - START ))s; summary in $SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
