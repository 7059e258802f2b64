#!/usr/bin/env bash
# One call on a GPU machine (H100/H200): build the extension for sm_90, run the benchmarks, run the GPU kernel tests.
#
#   bash benchmarks/gpu_run.sh OUTDIR
#
# Sized for the device tool: one command of at most 10 minutes, and at most 8 files back from OUTDIR. It writes
#   OUTDIR/run.log              everything printed, step by step (environment, build, benchmarks, tests)
#   OUTDIR/<device_tag>.csv     the benchmark rows, appended case by case (a stopped run keeps what it measured)
#   OUTDIR/plots.tar            the PNGs (loose in OUTDIR while the benchmarks run: at most 6)
# Copy the CSV and the PNGs into benchmarks/results/ afterwards; `python benchmarks/bench_<op>.py --plot-only --csv
# OUTDIR/<device_tag>.csv --out DIR` redraws any plot from the CSV.
#
# Order: build, benchmarks (the issues' figures at their target shapes; each benchmark stopped after BENCH_TIMEOUT
# seconds, the rows it wrote kept), then the GPU kernel tests under TESTS_TIMEOUT. Every step runs even if an
# earlier one failed; the exit status is non-zero if any did. A `bench` or `tests` step on a GPU machine without
# the CUDA build of mdus_kernels._C (a fresh machine) builds it first.
#
# Environment: STEPS (default "build bench tests"); BENCH_ONLY (the benchmarks, in order; default "patch_pool
# upscale linear_cross_entropy cgmlp attention"); BENCH_TIMEOUT (seconds per benchmark, default 75); ARGS_<name>
# (a benchmark's own words, see `focus` below); BENCH_ARGS (words for every benchmark, e.g. "--quick"); TESTS
# (default: the kernel and attention test files); TESTS_TIMEOUT (default 100); PYTHON (default python3).
#
# Test wheels: the GPU image has no network and lacks some pure-Python test dependencies. Fetch them here, for
# the image's Python 3.12, into .gpu_wheels (ignored by git; carry it with the call):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .gpu_wheels expecttest jiwer rapidfuzz soundfile cffi pycparser gguf liger-kernel
set -u -o pipefail

if [ $# -ne 1 ]; then
    echo "usage: $0 OUTDIR" >&2
    exit 2
fi
OUT="$1"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
cd "$(dirname "$0")/.."
exec > >(tee -a "$OUT/run.log") 2>&1

# setup.py builds the CUDA kernels automatically when torch is a CUDA build and nvcc is found; MDUS_FORCE_CUDA is
# only for compile-checking on CPU machines, and MDUS_SKIP_CUDA_BUILD would drop the kernels we want to measure.
unset MDUS_FORCE_CUDA MDUS_SKIP_CUDA_BUILD MDUS_KERNEL_BACKEND
# Only sm_90 (H100/H200): half the nvcc time of setup.py's default "8.0;9.0".
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"  # the image's python3 is the one with its CUDA torch

STEPS="${STEPS:-build bench tests}"
BENCH_ONLY="${BENCH_ONLY:-patch_pool upscale linear_cross_entropy cgmlp attention}"
TESTS="${TESTS:-tests/test_patch_pool.py tests/test_attention.py tests/test_hf_attention.py tests/test_cgmlp.py \
tests/test_linear_cross_entropy.py tests/test_ebranchformer.py}"
status=0
want() { [[ " $STEPS " == *" $1 "* ]]; }
step() {  # step NAME CMD...: run CMD, remember a failure
    local name="$1"
    shift
    echo "=== $name: $*"
    local t0=$SECONDS
    "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
    if [ "$rc" -ne 0 ]; then
        status=1
    fi
    return 0
}
needs_cuda_build() {  # a GPU, and no CUDA build of mdus_kernels._C for it
    "$PY" -c "import sys, torch
if not torch.cuda.is_available(): sys.exit(1)
from mdus_kernels import _backend as b
sys.exit(1 if b.has_native_kernel('patch_pool_kernel', torch.device('cuda')) else 0)" 2>/dev/null
}

date -u +%FT%TZ
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'triton', triton.__version__)"
git rev-parse --short HEAD 2>/dev/null || echo "commit unknown (no .git in the copy)"

if [ -d .gpu_wheels ]; then  # into their own folder: the image's packages stay as they are
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/mdus_wheels \
        .gpu_wheels/*.whl; then
        export PYTHONPATH="/tmp/mdus_wheels${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "the wheels in .gpu_wheels did not install (fetched for another Python?): tests needing them fail"
        status=1
    fi
fi

# --no-deps: the machine has no network and already has torch/triton/numpy; pip must not try to resolve them.
build() { step build "$PY" -m pip install --no-build-isolation --no-deps -v -e .; }
if want build || { { want bench || want tests; } && needs_cuda_build; }; then
    build
fi
if want bench; then
    # The issues' target shapes (the scripts' own GPU sweeps are wider than one call allows); ARGS_<name> replaces
    # a benchmark's words, e.g. ARGS_attention="" for its full sweep.
    declare -A focus=(
        [patch_pool]="--tokens 262144 1048576 --dims 1024 2048"
        [upscale]=""
        [linear_cross_entropy]="--tokens 8192 32768 --dims 576 2048"
        [cgmlp]="--tokens 65536 --dims 768 1536 3072"
        [attention]="--dims 64 --seqlens 2048 8192"
    )
    for name in $BENCH_ONLY; do
        words_var="ARGS_$name"
        # shellcheck disable=SC2086  # lists of words on purpose
        step "bench $name" timeout "${BENCH_TIMEOUT:-75}" "$PY" "benchmarks/bench_$name.py" --device cuda \
            --out "$OUT" ${!words_var-${focus[$name]-}} ${BENCH_ARGS:-}
    done
    if compgen -G "$OUT/*.png" >/dev/null; then
        (cd "$OUT" && tar -cf plots.tar -- *.png && rm -f -- *.png)
    fi
fi
if want tests; then
    # shellcheck disable=SC2086
    step tests timeout "${TESTS_TIMEOUT:-100}" "$PY" -m pytest -q -p no:cacheprovider $TESTS
fi

echo "run.log, the CSV and plots.tar in $OUT (exit $status)"
exit $status
