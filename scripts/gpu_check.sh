#!/usr/bin/env bash
# The first-GPU-run check (issue 17): one short script for a machine with a GPU, in under ~8 minutes.
#
#   bash scripts/gpu_check.sh            # logs under ${OUT:-gpu_check_out}/
#
# It installs nothing beyond `make install`, then, each step under its own `timeout`:
#   1. nvidia-smi, torch / CUDA / cuDNN versions, the GPUs torch sees;
#   2. the GPU-relevant tests (device resolution, speed protocol, host syncs, backbones);
#   3. zero host syncs on the GPU itself: torch.cuda.set_sync_debug_mode("error") around the forward of tiny
#      EoMT (masked and unmasked) and of row 0 (vit_adapter_m2f);
#   4. a few-step tiny EoMT training on cuda with bf16 autocast and torch.compile;
#   5. `study bench` FPS of EoMT (masked and unmasked) against row 0 at tiny and S, eager and compiled, in two
#      passes of opposite order (interleaved, so that clock drift does not favour one model); each JSON row
#      names the SDPA kernels that really ran;
#   6. with 2 GPUs or more: a 2-GPU submitit local job (`study launch --cluster local`) and a 2-GPU torchrun
#      job, a few steps each.
# Every step's output goes to $OUT/<step>.log; a summary of pass/fail per step ends the run. After the install,
# all steps share a budget of BUDGET_S seconds (default 450): a step gets at most what is left, and steps that
# find less than 20 s left are skipped (and count as failed). Exit status: 0 all passed, 1 some step failed or
# was skipped, 3 no CUDA GPU here (nothing is run).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
PY=.venv/bin/python
STUDY=.venv/bin/study
NO_GPU=3

no_gpu() {
    echo "gpu_check: no CUDA GPU on this machine ($1); nothing was run. Run scripts/gpu_check.sh on a machine with an NVIDIA GPU." >&2
    exit "$NO_GPU"
}

# ---- 0. a GPU at all? (before anything is installed)
command -v nvidia-smi >/dev/null 2>&1 || no_gpu "nvidia-smi not found"
NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
[ "${NGPU:-0}" -ge 1 ] || no_gpu "nvidia-smi lists no GPU"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
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
    [ "$verdict" = ok ] || tail -n 15 "$OUT/$name.log" | sed 's/^/    | /'
    return 0
}

step install 240 make install
[ -x "$PY" ] || { echo "gpu_check: make install did not create $PY; see $OUT/install.log" >&2; exit 1; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || no_gpu "nvidia-smi lists $NGPU GPU(s) but torch.cuda.is_available() is False"
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-450} ))

# ---- 1. the machine
step nvidia_smi 30 nvidia-smi
step versions 60 "$PY" - <<'EOF'
import torch, timm
print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version(), 'timm', timm.__version__)
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f'cuda:{i}', p.name, f'{p.total_memory / 2**30:.0f} GiB', f'sm_{p.major}{p.minor}')
print('SDPA enabled: flash', torch.backends.cuda.flash_sdp_enabled(), 'mem_efficient',
      torch.backends.cuda.mem_efficient_sdp_enabled(), 'cudnn', torch.backends.cuda.cudnn_sdp_enabled(), 'math',
      torch.backends.cuda.math_sdp_enabled())
EOF

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

# ---- 5. FPS: EoMT against row 0, interleaved passes, eager then compiled
BENCH=(--set bench.warmup=10 --set bench.iters=50 --no-breakdown)
step bench_eager_pass1 90 "$STUDY" bench --variants vit_adapter_m2f,eomt_masked,eomt --sizes tiny,S \
    --img-size 640 "${BENCH[@]}" --json "$OUT/bench_eager_pass1.json"
step bench_eager_pass2 90 "$STUDY" bench --variants eomt,eomt_masked,vit_adapter_m2f --sizes S,tiny \
    --img-size 640 "${BENCH[@]}" --json "$OUT/bench_eager_pass2.json"
step bench_compiled 120 "$STUDY" bench --variants eomt,vit_adapter_m2f --sizes S --img-size 640 --compile \
    "${BENCH[@]}" --json "$OUT/bench_compiled.json"

# ---- 6. two GPUs: a submitit local job and a torchrun job, a few steps each
if [ "$NGPU" -ge 2 ]; then
    step launch_local_2gpu 120 "$STUDY" launch experiments/quickstart_grid.yaml --cluster local --steps train \
        --wait --set output_dir="$OUT/launch_local" --set launch.gpus_per_node=2 --set train.max_steps=6 \
        --set train.checkpoint_every=3 --set train.tensorboard=false
    step torchrun_2gpu 90 env -u WORLD_SIZE -u RANK -u LOCAL_RANK "$PY" -m torch.distributed.run --standalone \
        --nproc_per_node=2 -m study.cli train experiments/quickstart.yaml --run-dir "$OUT/torchrun_2gpu" \
        --set train.max_steps=6 --set train.checkpoint_every=3 --set train.tensorboard=false
else
    echo "launch_local_2gpu / torchrun_2gpu: skipped (1 GPU)" | tee -a "$SUMMARY"
fi

echo
echo "gpu_check: $(( $(date +%s) - START ))s; summary in $SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
