#!/usr/bin/env bash
# The GPU checks in one run, on a CUDA machine whose python already has torch and triton:
#   1. the CUDA tests (Triton backend against the reference, every layer against torch.nn on the GPU,
#      the fused activation epilogue, numerics bounds, CUDA graphs, torch.compile);
#   2. the numerics table on the GPU (normkit and torch.nn against a float64 CPU truth);
#   3. `normkit bench --device cuda`, timed from CUDA-graph replays (kernels alone) and eagerly;
#   4. benchmarks/cuda_profile.py: per-kernel device time, host profile, planner sweep;
# then each bench JSON as a Markdown table (benchmarks/bench_table.py) beside it. Every step's output goes
# to one log, DIR/run.log, so a run leaves five files: the log, two bench JSONs and their tables.
# Usage: benchmarks/cuda_check.sh [RESULT_DIR]   (PYTHON=... to pick the interpreter)
# Each step has its own time limit (TEST_LIMIT, BENCH_LIMIT, PROFILE_LIMIT seconds), so one that
# hangs or runs out of time leaves the others' results; the bench JSON is written after every case.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DIR=${1:-cuda-results}
mkdir -p "$DIR"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s)" | tee -a "$DIR/run.log"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$DIR/run.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0))s" | tee -a "$DIR/run.log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem --format=csv
$PY - <<'EOF'
import numba, torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "numba", numba.__version__, torch.cuda.get_device_name())
EOF

parallel=()  # pytest-xdist, where installed, spreads Triton's compiles over the CPU cores
$PY -c "import xdist" 2>/dev/null && parallel=(-n "${WORKERS:-8}")
step tests "${TEST_LIMIT:-300}" $PY -m pytest -q -p no:cacheprovider "${parallel[@]}" -k "cuda or triton" \
    --deselect tests/test_triton_backend.py::test_kernels_under_the_interpreter \
    tests/test_triton_backend.py tests/test_activation.py tests/test_equivalence.py tests/test_numerics.py
step numerics 60 $PY benchmarks/numerics.py --markdown --device cuda
step bench-graph "${BENCH_LIMIT:-400}" $PY -m normkit.cli bench --device cuda --cuda-graph \
    --min-time 0.02 --rounds 2 --json "$DIR/bench-graph.json"
step bench-eager "${BENCH_LIMIT:-400}" $PY -m normkit.cli bench --device cuda \
    --min-time 0.02 --rounds 2 --json "$DIR/bench-eager.json"
step profile "${PROFILE_LIMIT:-200}" $PY benchmarks/cuda_profile.py
for f in "$DIR"/bench-graph.json "$DIR"/bench-eager.json; do
    [ -f "$f" ] && $PY benchmarks/bench_table.py "$f" > "${f%.json}.md"
done
