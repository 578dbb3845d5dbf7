#!/usr/bin/env bash
# One call on a lent GPU machine (README, "Results"): build with the CUDA kernels and the
# test-only ops, run every test (CUDA-marked ones included) and the CUDA benchmarks, leaving logs and the report
# under $OUT. Knobs: TESTS (pytest args, default "tests"), BENCH_FILTER (pytest -k for the
# benchmarks, empty = all, "none" = skip), BENCH_ONLY (op stems), BENCH_TIMEOUT (seconds per
# benchmark file), SEGKERNELS_BENCH_SCALE.
set -uo pipefail
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
PY="${PY:-python3}"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  date -u
} 2>&1 | tee "$OUT/env.txt"
stamp build
# Some images put a second g++ first on PATH (or in Python's LDSHARED) whose libstdc++ differs
# from the one torch loads; mixing them crashes when C++ formats an error message. Use the
# system compiler that torch's headers and libstdc++ belong to.
if [ -x /usr/bin/g++ ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++ LDSHARED="/usr/bin/g++ -shared" LDCXXSHARED="/usr/bin/g++ -shared"; fi
SEGKERNELS_FORCE_CUDA=1 SEGKERNELS_BUILD_TESTING=1 $PY -m pip install -q --no-build-isolation --no-deps -e . \
  > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
$PY -c "import segkernels as s; print('kernels', s.kernels_available(), 'cuda kernels', s.cuda_kernels_available(), s.kernel_load_error())"
stamp tests
XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
timeout "${TEST_TIMEOUT:-300}" $PY -m pytest ${TESTS:-tests} -q $XDIST -p no:cacheprovider --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "pytest rc=$?"
grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -40
tail -3 "$OUT/tests.log"
if [ "${BENCH_FILTER:-}" != "none" ]; then
  stamp bench
  # Per-file raw JSON stays on the machine; only the merged report comes back (8 files at most).
  SEGKERNELS_BENCH_DEVICE=cuda $PY benchmarks/run.py ${BENCH_FILTER:+--filter "$BENCH_FILTER"} \
    ${BENCH_ONLY:+--only "$BENCH_ONLY"} --timeout "${BENCH_TIMEOUT:-150}" --out /tmp/bench-results > "$OUT/bench.log" 2>&1
  echo "bench rc=$?"
  mkdir -p "$OUT/results" && cp /tmp/bench-results/*/benchmark.json /tmp/bench-results/*/report.md \
    /tmp/bench-results/*/speedup.png "$OUT/results/" 2>/dev/null
  grep -E "^\| |Incomplete|stopped after" "$OUT/bench.log" | cut -c1-160 | tail -${BENCH_TAIL:-60}
fi
stamp done
