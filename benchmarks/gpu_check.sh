#!/usr/bin/env bash
# The one-command GPU check: build for this GPU, parity tests, benchmarks, bandwidth, summary.
#
#   bash benchmarks/gpu_check.sh OUT_DIR             # on a CUDA machine (about 8 minutes)
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR   # the same stages on the CPU, tiny sizes
#
# Stages, each in its own time box (`timeout`; a stage that fails or runs out of time is
# reported and the next one runs):
#   env        device, versions, commit
#   build      pip install --no-build-isolation --no-deps -e . with the CUDA extension for this
#              GPU's compute capability only, MAX_JOBS = core count (dry run: csrc/cuda/
#              compiled for the CPU, the CUDA emulation of tests/test_cuda_emulation.py)
#   parity     the GPU parity tests (CUDA tensors: compiled Triton and the cuda backend) and, in
#              separate processes under TRITON_INTERPRET=1, the CPU-tensor Triton tests; both
#              split into shards that run side by side (benchmarks/gpu_check_shard.py)
#   blocks     every EfficientNet-B0 block, forward+backward, batch 128, bfloat16,
#              channels_last: eager, fused-triton, fused-cuda (pytest benchmarks/,
#              FUSED_MBCONV_BENCH_SIZE=gpu-check)
#   bandwidth  each memory-bound fused kernel's bytes (launch accounting) / time, against a
#              device-to-device copy timed in the same run
#   network    an efficientnet_b0 training step, batch 256, 224x224, AMP bf16, channels_last
#              (fused-mbconv bench: eager, fused-triton, fused-cuda, then torch.compile)
#   compile    the blocks again with torch.compile (slowest to warm up, so last; GPU only: the
#              dry run reports it skipped)
#   summary    OUT_DIR/summary.md (printed) and, named after the device and date, the merged
#              results JSON, the block table and plot (benchmarks/report.py) and the log
#
# Parity selection (tests/ is extended by others; this rule picks up their GPU tests): in
# PARITY_FILES, a GPU test says `gpu` or `cuda` in its name or parameter ids (e.g.
# test_block_matches_eager_on_gpu[...-triton], test_cuda_matches_reference); the CPU-tensor
# Triton tests say `triton` (module or backend id) and neither. The nvcc compile-only tests
# (test_cuda_source_compiles_for_*) are left out: the build stage compiles the same sources.
#
# Time: the stages share GPU_CHECK_BUDGET_S (default 470 s; 3600 s for --dry-run) in
# proportion to their weights below; a stage that finishes early leaves its time to the later
# ones. A pytest stage is stopped with SIGINT, so it still writes what it measured or ran.
set -uo pipefail

usage() {
    echo "usage: bash benchmarks/gpu_check.sh [--dry-run] OUT_DIR" >&2
    exit 2
}
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
[ $# -eq 1 ] || usage
case "$1" in -*) usage ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
cd "$ROOT" || exit 1
if [ $DRY = 0 ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "gpu_check: no CUDA device here ($PY: torch.cuda.is_available() is False); run it" \
         "on a GPU machine, or use --dry-run for the CPU rehearsal" >&2
    exit 1
fi
OUT=$1
if [ -e "$OUT" ] && [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "gpu_check: $OUT is not empty; give a new or empty directory" >&2
    exit 2
fi
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
LOG="$SCRATCH/gpu_check.log"
STAGES="$SCRATCH/stages.tsv"
: > "$STAGES"

CORES=$(nproc)
PARITY_FILES=(tests/test_fused_mbconv.py tests/test_dwconv_bn_silu.py tests/test_extension.py
              tests/test_kernel_interface.py tests/test_triton_kernels.py)
GPU_SELECT="(gpu or cuda) and not compiles_for"
INTERPRETER_SELECT="triton and not gpu and not cuda"
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -p gpu_check_shard)
export PYTHONPATH="$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}"  # the shard plugin
export PYTHONUNBUFFERED=1

if [ $DRY = 1 ]; then
    MODE=(--dry-run)
    BUDGET=${GPU_CHECK_BUDGET_S:-3600}  # time boxes stop a hang, not a slow CI machine
    # The CUDA kernels run as the "cpu" backend through the emulated library (built below).
    export FUSED_MBCONV_LIBRARY="$SCRATCH/emulated.so"
    export TRITON_INTERPRET=1  # fused-triton on CPU tensors (blocks, bandwidth)
    export OMP_NUM_THREADS=1
    GPU_SHARDS=1
    INTERPRETER_SHARDS=1
    # Stand-ins for the GPU selection: the emulated CUDA kernels on one block configuration,
    # a few interpreted Triton kernels.
    GPU_TESTS=(tests/test_fused_mbconv.py -k
               "test_block_matches_eager and not gpu and cpu and e6-k3-s2 and float32 and train")
    INTERPRETER_TESTS=(tests/test_kernel_interface.py -k
                       "$(echo "triton and ((test_dwconv_matches_reference and k3-s1 and float32" \
                               "and nhwc and train and no-affine) or (low_precision and k5-s2-odd" \
                               "and float32 and nhwc and train))")")
    # float16 for bfloat16: CPUs without bfloat16 instructions emulate it, slowly.
    BENCH_ENV=(FUSED_MBCONV_BENCH_SIZE=tiny FUSED_MBCONV_BENCH_DEVICE=cpu
               FUSED_MBCONV_BENCH_DTYPE=float16)
    BLOCK_PROVIDERS=eager,fused-triton,fused-cpu
    BLOCK_SELECT="and e1"  # one block: its interpreted Triton kernels take seconds a call
    NETWORK=(--batch 2 --resolution 32 --steps 1 --warmup 0 --amp fp16 --backend cpu
             --no-compile)
    BANDWIDTH_BACKENDS=triton,cpu
else
    MODE=()
    BUDGET=${GPU_CHECK_BUDGET_S:-470}
    GPU_SHARDS=$(( CORES >= 8 ? CORES / 3 : 1 ))  # each compiles its Triton kernels
    INTERPRETER_SHARDS=$(( CORES >= 8 ? CORES / 2 : 1 ))
    GPU_TESTS=("${PARITY_FILES[@]}" -k "$GPU_SELECT")
    INTERPRETER_TESTS=("${PARITY_FILES[@]}" -k "$INTERPRETER_SELECT")
    BENCH_ENV=(FUSED_MBCONV_BENCH_SIZE=gpu-check FUSED_MBCONV_BENCH_DEVICE=cuda
               FUSED_MBCONV_BENCH_DTYPE=bfloat16)
    BLOCK_PROVIDERS=eager,fused-triton,fused-cuda
    BLOCK_SELECT=""
    NETWORK=(--batch 256 --resolution 224 --steps 10 --warmup 3 --amp bf16 --backend triton
             --backend cuda)
    BANDWIDTH_BACKENDS=triton,cuda
fi
BENCH_ENV+=(FUSED_MBCONV_BENCH_CHANNELS_LAST=1)

SUMMARY_RESERVE=45
DEADLINE=$(( SECONDS + BUDGET - SUMMARY_RESERVE ))
# Weights: each stage's share of the budget (seconds of the default run).
WEIGHTS_LEFT=$(( 20 + 140 + 130 + 45 + 25 + 60 + 15 ))

log() { echo "$*" | tee -a "$LOG"; }

# run_stage NAME WEIGHT FUNCTION: FUNCTION runs with BOX = its time box in seconds.
run_stage() {
    local name=$1 weight=$2 fn=$3 start status rc
    BOX=$(( (DEADLINE - SECONDS) * weight / WEIGHTS_LEFT ))
    WEIGHTS_LEFT=$(( WEIGHTS_LEFT - weight ))
    (( BOX < 5 )) && BOX=5
    log "== $name: time box ${BOX} s"
    start=$SECONDS
    "$fn" >> "$LOG" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status=timeout ;;  # 137: still running at the box's end + 10 s, killed
        99) status="skipped (dry run)" ;;
        *) status="failed (exit $rc)" ;;
    esac
    printf '%s\t%s\t%s\t%s\n' "$name" "$status" $(( SECONDS - start )) "$BOX" >> "$STAGES"
    log "== $name: $status after $(( SECONDS - start )) s"
}

# boxed [VAR=value...] COMMAND...: run in the stage's time box (SIGINT, then SIGKILL).
boxed() { timeout -s INT -k 10 "$BOX" env "$@"; }

stage_env() {
    boxed "$PY" benchmarks/gpu_check.py env "${MODE[@]}" "$SCRATCH/env.json"
}

stage_build() {
    if [ $DRY = 1 ]; then
        boxed "$PY" benchmarks/gpu_check.py build-emulation "$FUSED_MBCONV_LIBRARY"
        return
    fi
    local arch
    arch=$("$PY" benchmarks/gpu_check.py arch) || return 1
    echo "building for compute capability $arch only, MAX_JOBS=$CORES"
    local install=(FUSED_MBCONV_CUDA=1 FUSED_MBCONV_CUDA_ARCHS="$arch" MAX_JOBS="$CORES"
                   "$PY" -m pip install --no-build-isolation --no-deps -e .)
    local started=$SECONDS
    boxed "${install[@]}" 2>&1 | tee "$SCRATCH/pip.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" != 0 ] && grep -q externally-managed-environment "$SCRATCH/pip.log"; then
        BOX=$(( BOX - (SECONDS - started) ))
        boxed "${install[@]}" --break-system-packages
        rc=$?
    fi
    [ "$rc" = 0 ] || return "$rc"
    "$PY" -c 'import fused_mbconv as fm
for name in ("triton", "cuda"):
    print(name, *fm.backends.backend_status(name, "cuda"))'
}

stage_parity() {
    local pids=() rc=0 k
    # CUDA tensors: compiled Triton kernels and the cuda backend (a missing build fails here).
    local require=triton,cuda
    [ $DRY = 1 ] && require=cpu
    for (( k = 0; k < GPU_SHARDS; k++ )); do
        boxed FUSED_MBCONV_REQUIRE_BACKENDS=$require GPU_CHECK_SHARD=$k/$GPU_SHARDS \
            "${PYTEST[@]}" --junitxml="$SCRATCH/parity-gpu-$k.xml" "${GPU_TESTS[@]}" \
            > "$SCRATCH/parity-gpu-$k.log" 2>&1 &
        pids+=($!)
    done
    # CPU tensors through the Triton interpreter, in processes of their own. Triton 3.6's
    # interpreter turns one-element arrays into scalars, which NumPy 2.4 refuses: every test
    # would fail for that alone, so the suite is reported as not run, with the reason.
    local blocker
    blocker=$("$PY" - <<'PYTHON'
import numpy, triton
version = lambda s: tuple(int(part) for part in s.split(".")[:2])
if version(triton.__version__) < (3, 7) and version(numpy.__version__) >= (2, 4):
    print(f"not run: the interpreter of triton {triton.__version__} needs numpy < 2.4, "
          f"this machine has {numpy.__version__}")
PYTHON
)
    if [ -n "$blocker" ]; then
        echo "$blocker" > "$SCRATCH/parity-interpreter-0.log"
        echo "parity: interpreter suite $blocker" | tee -a "$LOG"
    fi
    for (( k = 0; k < (${#blocker} ? 0 : INTERPRETER_SHARDS); k++ )); do
        boxed TRITON_INTERPRET=1 OMP_NUM_THREADS=1 GPU_CHECK_SHARD=$k/$INTERPRETER_SHARDS \
            "${PYTEST[@]}" --junitxml="$SCRATCH/parity-interpreter-$k.xml" \
            "${INTERPRETER_TESTS[@]}" > "$SCRATCH/parity-interpreter-$k.log" 2>&1 &
        pids+=($!)
    done
    for pid in "${pids[@]}"; do
        wait "$pid"
        local code=$?
        if [ $code = 124 ] || { [ $code != 0 ] && [ $rc = 0 ]; }; then rc=$code; fi
    done
    if [ $DRY = 1 ]; then  # the GPU selection itself must still collect tests
        "$PY" -m pytest --collect-only -q -p no:cacheprovider "${PARITY_FILES[@]}" \
            -k "$GPU_SELECT" > "$SCRATCH/gpu-selection.txt" 2>&1
        tail -n 1 "$SCRATCH/gpu-selection.txt"
    fi
    return $rc
}

# bench_blocks PROVIDERS RESULTS: the B0 blocks' forward+backward (benchmarks/, the suite).
bench_blocks() {
    boxed "${BENCH_ENV[@]}" FUSED_MBCONV_BENCH_PROVIDERS="$1" FUSED_MBCONV_BENCH_RESULTS="$2" \
        "$PY" -m pytest -q -p no:cacheprovider benchmarks \
        -k "test_b0_block and forward+backward $BLOCK_SELECT"
}

stage_blocks() {
    bench_blocks "$BLOCK_PROVIDERS" "$SCRATCH/blocks-0.json"
}

stage_compile() {
    [ $DRY = 1 ] && return 99  # Inductor on the CPU takes minutes for what it shows here
    bench_blocks compile "$SCRATCH/blocks-1.json"
}

stage_network() {
    boxed "$PY" -m fused_mbconv bench efficientnet_b0 --channels-last \
        "${NETWORK[@]}" --json "$SCRATCH/network.json"
}

stage_bandwidth() {
    boxed "${BENCH_ENV[@]}" "$PY" benchmarks/gpu_check.py bandwidth "${MODE[@]}" \
        --backends "$BANDWIDTH_BACKENDS" "$SCRATCH/bandwidth.json"
}

log "gpu_check: $( [ $DRY = 1 ] && echo 'dry run (CPU)' || echo GPU ), budget ${BUDGET} s," \
    "$CORES cores, output $OUT"
run_stage env 20 stage_env
run_stage build 140 stage_build
run_stage parity 130 stage_parity
run_stage blocks 45 stage_blocks
run_stage bandwidth 25 stage_bandwidth
run_stage network 60 stage_network
run_stage compile 15 stage_compile
timeout -k 10 "$SUMMARY_RESERVE" "$PY" benchmarks/gpu_check.py summary "${MODE[@]}" \
    "$SCRATCH" "$OUT"
