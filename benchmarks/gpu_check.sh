#!/usr/bin/env bash
# The GPU verification of vlcore, in one call: build with CUDA, run the whole test suite on the GPU (the
# CUDA kernels against the CPU references), run every benchmark, check the SASS, print a summary LAST.
#
#   bash benchmarks/gpu_check.sh                 # from the repo root on a CUDA machine, torch preinstalled
#   GPU_CHECK_BENCH=0 bash benchmarks/gpu_check.sh   # build + tests only
#
# Needs no network: it builds against the installed torch (--no-build-isolation). Logs and CSVs go to
# $OUT (or benchmarks/results/gpu_check). It carries on to the summary when a step fails and exits
# non-zero if any did.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
ARCH=${VLCORE_CUDA_ARCH_LIST:-9.0a}
BENCH_TIMEOUT=${GPU_CHECK_BENCH_TIMEOUT:-240}
failed=0
summary=()
note() { summary+=("$(printf '%-34s %s' "$1" "$2")"); }

# 1. Build: CUDA must be built (ON), for the Hopper arch by default. --no-deps: the GPU machine has no network,
#    and its image already holds the runtime dependencies (torch, numpy, safetensors, Pillow, tqdm, ...).
t0=$SECONDS
if VLCORE_ENABLE_CUDA=ON VLCORE_CUDA_ARCH_LIST="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python -m pip install --no-build-isolation --no-deps -v -e . > "$LOG/build.log" 2>&1; then
  note "build (CUDA, $ARCH)" "ok in $((SECONDS - t0)) s"
else
  tail -40 "$LOG/build.log"
  note "build (CUDA, $ARCH)" "FAILED after $((SECONDS - t0)) s (see build.log)"
  failed=1
fi

# 2. Machine and versions.
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$LOG/gpu.txt"
python - <<'EOF' | tee -a "$LOG/gpu.txt"
import torch
try:
    import vlcore
    built = vlcore.cuda_available()
except Exception as e:  # keep going: the summary says what broke
    built = f"import failed: {e}"
print(f"torch {torch.__version__} cuda {torch.version.cuda} device {torch.cuda.get_device_name()} "
      f"vlcore.cuda_available() = {built}")
EOF
grep -q "cuda_available() = True" "$LOG/gpu.txt" && note "vlcore CUDA kernels" "built" || { note "vlcore CUDA kernels" "MISSING"; failed=1; }

# 3. Tests: the suite parametrizes over cpu and cuda by itself when CUDA kernels and a GPU are present.
t0=$SECONDS
python -m pytest python_tests -q -p no:cacheprovider > "$LOG/tests.log" 2>&1
rc=$?
result=$(tail -1 "$LOG/tests.log")
[ $rc -eq 0 ] || { grep -E "^(FAILED|ERROR)" "$LOG/tests.log" | head -20; failed=1; }
note "tests (cpu + cuda)" "$result ($((SECONDS - t0)) s, rc $rc)"

# 4. Benchmarks, each under a time cap; their tables are gathered for the summary.
if [ "${GPU_CHECK_BENCH:-1}" != 0 ]; then
  for bench in benchmarks/bench_*.py; do
    name=$(basename "$bench" .py)
    t0=$SECONDS
    if timeout "$BENCH_TIMEOUT" python "$bench" --csv "$LOG/$name.csv" > "$LOG/$name.log" 2>&1; then
      note "$name" "ok in $((SECONDS - t0)) s"
    else
      tail -15 "$LOG/$name.log"
      note "$name" "FAILED or timed out ($((SECONDS - t0)) s)"
      failed=1
    fi
  done
fi

# 5. SASS: the row-copy kernels should use 16-byte loads and stores (LDG.E.128 / STG.E.128).
so=$(python -c "import vlcore._C as c; print(c.__file__)" 2>/dev/null)
if [ -n "$so" ] && command -v cuobjdump > /dev/null; then
  cuobjdump -sass "$so" > "$LOG/vlcore.sass" 2>/dev/null
  ldg=$(grep -c "LDG.E.128" "$LOG/vlcore.sass"); stg=$(grep -c "STG.E.128" "$LOG/vlcore.sass")
  mma=$(grep -c -E "HGMMA|HMMA" "$LOG/vlcore.sass")
  note "SASS of vlcore._C" "LDG.E.128 x$ldg, STG.E.128 x$stg, HMMA/HGMMA x$mma"
else
  note "SASS of vlcore._C" "skipped (no cuobjdump or no build)"
fi

# Summary, last: the steps, then every benchmark's tables.
echo
echo "================================ vlcore gpu_check ================================"
for line in "${summary[@]}"; do echo "$line"; done
for log in "$LOG"/bench_*.log; do
  [ -f "$log" ] && sed -n '/^## /,$p' "$log"
done
echo "logs: $LOG"
exit $failed
