#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): build the extension for sm_90, run the GPU tests, run the benchmarks.
#
#   bash benchmarks/gpu_run.sh OUTDIR
#
# Writes OUTDIR/{build,tests,bench}.log, OUTDIR/<device_tag>.csv and OUTDIR/<op>_<device_tag>.png (copy them into
# benchmarks/results/ afterwards). Every step runs even if an earlier one failed, so one broken test does not cost
# the benchmark numbers; the exit status is non-zero if any step failed.
#
# Environment: STEPS (default "build tests bench") picks steps, e.g. STEPS=bench for a second call when one call
# may not exceed a time limit; BENCH_ARGS is passed on to run_all.py (e.g. "--quick" or "--only patch_pool").
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."

# setup.py builds the CUDA kernels automatically when torch is a CUDA build and nvcc is found; MDUS_FORCE_CUDA is
# only for compile-checking on CPU machines, and MDUS_SKIP_CUDA_BUILD would drop the kernels we want to measure.
unset MDUS_FORCE_CUDA MDUS_SKIP_CUDA_BUILD MDUS_KERNEL_BACKEND
# Only sm_90 (H100/H200): half the nvcc time of setup.py's default "8.0;9.0".
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

STEPS="${STEPS:-build tests bench}"
status=0
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME LOG CMD...: run CMD, tee its output to LOG, remember a failure
    local name="$1" log="$2"
    shift 2
    echo "=== $name: $*" | tee "$log"
    local t0=$SECONDS
    "$@" 2>&1 | tee -a "$log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$log"
    if [ "$rc" -ne 0 ]; then
        status=1
    fi
    return 0
}

{
    date -u +%FT%TZ
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
    python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
    git rev-parse --short HEAD 2>/dev/null || echo "commit unknown"
} 2>&1 | tee "$OUT/env.log"

# --no-deps: the machine has no network and already has torch/triton/numpy; pip must not try to resolve them.
if want build; then
    step build "$OUT/build.log" python -m pip install --no-build-isolation --no-deps -v -e .
fi
if want tests; then
    # The GPU image lacks the pure-Python test dependencies and has no network: they travel as wheels made here
    # with `pip download -d .gpu_wheels hypothesis sortedcontainers attrs expecttest jiwer rapidfuzz soundfile gguf
    # --only-binary=:all:` (carried, not committed; keep it under the 64 MiB carry limit). Tests whose optional
    # pieces are still missing there (espeak-ng, the embedded SmolLM2 package) skip with the reason.
    if [ -d .gpu_wheels ]; then
        python -m pip install -q --no-index --no-deps .gpu_wheels/*.whl 2>&1 | tee -a "$OUT/env.log"
    fi
    step tests "$OUT/tests.log" python -m pytest -q tests
fi
if want bench; then
    python -c "import matplotlib" 2>/dev/null || echo "note: matplotlib is missing here, so no PNGs; redraw them \
elsewhere: python benchmarks/bench_<op>.py --plot-only --csv OUTDIR/<device_tag>.csv --out OUTDIR" | tee -a "$OUT/env.log"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of words on purpose
    step bench "$OUT/bench.log" python benchmarks/run_all.py --device cuda --out "$OUT" ${BENCH_ARGS:-}
fi

echo "logs, CSVs and plots in $OUT (exit $status)"
exit $status
