#!/usr/bin/env bash
# The GPU verification of vlcore in one call that fits a wall-clock budget: build with CUDA, run the CUDA
# tests family by family, compute-sanitizer on a few of them, one benchmark row per goal row of
# BENCHMARKS.md (each a ratio to a peer measured in the same run), the SASS instruction counts, and a
# summary printed LAST.
#
#   bash benchmarks/device_check.sh                    # from the repo root of a CUDA machine, torch preinstalled
#   bash benchmarks/device_check.sh --budget 900       # another wall budget in seconds (default 540)
#   bash benchmarks/device_check.sh --dry-run          # no GPU: the same logic on CPU (CI runs it; budget 1800 s)
#
# Budget: each step has a share; a step's slice is the time the budget has left times its share over the
# shares of the steps still to run, so a step that finishes early hands its time on to the later ones in
# proportion, and a step that overruns its slice is killed (with its processes) and reported, and the steps
# after it still get theirs. Steps that need the CUDA build are reported skipped when the build failed. The
# summary gives each step's time against its slice and the total against the budget. The script exits 1 if
# any step failed, was killed or was skipped for want of budget.
#
# Results go to $OUT (or benchmarks/results/device_check), at most 8 files: summary.txt, build.log, tests.log,
# sanitizer.log, bench.csv (every benchmark row, one schema), bench.log (each bench's tables), sass.txt.
#
# Peers that the GPU image lacks travel as wheels in ./.whl, installed (no network, no dependencies) into
# /tmp/device_check_site when present. open_clip, the peer of the CLIP training step, was fetched with:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13
# (all three are pure Python, 1.6 MB; open_clip's other needs, timm, huggingface_hub, regex, safetensors,
# tqdm and torchvision, are in the image.) The device tool then carries .whl with the call. Environment: PYTHON (default python3), VLCORE_CUDA_ARCH_LIST (default 9.0a),
# DEVICE_CHECK_DRY_RUN=1 (= --dry-run), DEVICE_CHECK_BUDGET (= --budget), DEVICE_CHECK_STEPS (a space-
# separated subset of the step names below, for a quick rerun of a few steps).
set -uo pipefail
cd "$(dirname "$0")/.."
SELF=benchmarks/device_check.sh
PYTHON=${PYTHON:-python3}
ARCH=${VLCORE_CUDA_ARCH_LIST:-9.0a}
DRY=${DEVICE_CHECK_DRY_RUN:-0}
BUDGET=${DEVICE_CHECK_BUDGET:-}
STEP=""
while [ $# -gt 0 ]; do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --step) STEP=$2; shift ;;  # internal: run one step (the script calls itself under `timeout`)
    *) echo "device_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
# The dry run's budget is generous: it checks the logic, not the speed of a shared CI machine (its budget
# probe checks the kill).
[ -n "$BUDGET" ] || { [ "$DRY" = 1 ] && BUDGET=1800 || BUDGET=540; }
export PYTHON ARCH DEVICE_CHECK_DRY_RUN=$DRY PYTHONUNBUFFERED=1
export OUT=${OUT:-benchmarks/results/device_check}
mkdir -p "$OUT"
export WORK=${DEVICE_CHECK_WORK:-$(mktemp -d /tmp/device_check.XXXXXX)}
# Where the wheels of ./.whl are installed (step peers); first on the path, so every later step sees them.
export PYTHONPATH=/tmp/device_check_site${PYTHONPATH:+:$PYTHONPATH}

# Op families: the test files of each (old and new names alike: missing files are skipped).
declare -A FAMILY_TESTS=(
  [seq_pack]="python_tests/ops/test_seq_pack.py python_tests/test_packing.py"
  [attention]="python_tests/ops/test_attention.py python_tests/nn/test_attention.py"
  [tome]="python_tests/ops/test_tome.py python_tests/ops/test_token_merge.py python_tests/nn/test_tome_modules.py"
  [token_grid]="python_tests/ops/test_token_grid.py python_tests/ops/test_token_pool.py"
  [nvfp4]="python_tests/ops/test_nvfp4.py python_tests/nn/test_nvfp4_linear.py"
  [models]="python_tests/nn/test_backend_wiring.py python_tests/nn/test_merging_torch.py python_tests/models"
)
FAMILIES="seq_pack attention tome token_grid nvfp4 models"
BENCHES="seq_pack attention tome token_grid nvfp4 models train"

# Shares in per mille (sum 1000). The build's is large because every later step needs it and a first build
# compiles every kernel; an incremental one hands most of it on. Benches get the share of their goal rows.
declare -A SHARE=(
  [peers]=15 [build]=320 [env]=20 [collect]=45
  [test_seq_pack]=25 [test_attention]=70 [test_tome]=30 [test_token_grid]=20 [test_nvfp4]=40 [test_models]=15
  [memcheck]=45 [racecheck]=30
  [bench_seq_pack]=20 [bench_attention]=55 [bench_tome]=30 [bench_token_grid]=20 [bench_nvfp4]=40
  [bench_models]=60 [bench_train]=85 [sass]=15
)
GRACE=10  # seconds kept back from the slices: the kill's grace period and the summary
ORDER="peers build env collect"
for f in $FAMILIES; do ORDER+=" test_$f"; done
ORDER+=" memcheck racecheck"
for b in $BENCHES; do ORDER+=" bench_$b"; done
ORDER+=" sass"
if [ "$DRY" = 1 ]; then
  # The dry run checks the kill itself: a step that sleeps past its 3-second slice must be reported killed.
  ORDER="budget_probe $ORDER"
  SHARE[budget_probe]=0
fi

# ---------------------------------------------------------------------------------------------------------
# Helpers used inside the steps. A step writes one line of detail to $WORK/detail.<step>; its exit status
# says ok (0), failed (1) or skipped (3).

detail() { echo "$*" > "$WORK/detail.$STEP"; }

section() {  # a header in a log, so that one file can hold every step's output
  echo; echo "=============== $1 ($(date -u +%H:%M:%S)) ==============="
}

existing() { for f in "$@"; do [ -e "$f" ] && echo "$f"; done; }

# The tests run here: those parametrized on cuda (CI runs the CPU suite); in the dry run, CPU ones.
test_expr() { if [ "$DRY" = 1 ]; then echo cpu; else echo cuda; fi; }

# The collected node ids of a family (the first $2 of them, or all; dry run: from its first file only).
select_tests() {
  local family=$1 limit=$2 files f
  files=$(existing ${FAMILY_TESTS[$family]})
  [ "$DRY" = 1 ] && files=$(echo "$files" | head -1)
  for f in $files; do grep "^$f" "$WORK/collected.txt" 2>/dev/null; done |
    { if [ "$limit" -gt 0 ]; then head -n "$limit"; else cat; fi; }
}

step_budget_probe() { detail "sleeping 30 s in a 3 s slice"; sleep 30; }

step_peers() {
  if ! ls .whl/*.whl > /dev/null 2>&1; then detail "no ./.whl: peers from the image only"; return 0; fi
  if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/device_check_site .whl/*.whl > "$WORK/peers.log" 2>&1; then
    detail "installed $(ls .whl/*.whl | xargs -n1 basename | tr '\n' ' ')"
  else
    detail "pip install from .whl FAILED: $(tail -1 "$WORK/peers.log")"; return 1
  fi
}

step_build() {
  section "build" >> "$OUT/build.log"
  if [ "$DRY" = 1 ]; then
    # No CUDA here: the build is the one already installed; check that it imports.
    "$PYTHON" -c "import vlcore, torch; print('vlcore imports; cuda_available =', vlcore.cuda_available())" \
      >> "$OUT/build.log" 2>&1 || { detail "vlcore does not import (dry run)"; return 1; }
    detail "dry run: no CUDA build; the installed vlcore imports"
    return 0
  fi
  local mode="fresh"; ls -d build/*/CMakeCache.txt > /dev/null 2>&1 && mode="incremental"
  # --no-deps: the GPU machine has no network and its image holds the runtime dependencies.
  if VLCORE_ENABLE_CUDA=ON VLCORE_CUDA_ARCH_LIST="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
      "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . >> "$OUT/build.log" 2>&1 &&
      "$PYTHON" -c "import vlcore, sys; sys.exit(0 if vlcore.cuda_available() else 1)" >> "$OUT/build.log" 2>&1; then
    detail "$mode build for $ARCH on $(nproc) cores; vlcore.cuda_available() is True"
  else
    tail -30 "$OUT/build.log"
    detail "$mode build for $ARCH FAILED (see build.log)"; return 1
  fi
}

# One collection of every family's tests (one torch start-up), which the test and sanitizer steps select
# from (dry run: each family's first file, the only one its steps use).
step_collect() {
  local files=() f
  for f in $FAMILIES; do
    mapfile -t -O ${#files[@]} files < <(existing ${FAMILY_TESTS[$f]} | head -n "$([ "$DRY" = 1 ] && echo 1 || echo 99)")
  done
  "$PYTHON" -m pytest "${files[@]}" -q --collect-only -p no:cacheprovider -k "$(test_expr)" > "$WORK/collect.log" 2>&1
  grep "::" "$WORK/collect.log" > "$WORK/collected.txt"
  detail "$(wc -l < "$WORK/collected.txt") tests matching -k $(test_expr) in ${#files[@]} files"
  [ -s "$WORK/collected.txt" ] || { tail -20 "$WORK/collect.log"; return 1; }
}

step_env() {
  local info
  if [ "$DRY" = 1 ]; then
    info=$("$PYTHON" -c "import torch, platform; print(f'dry run on CPU: torch {torch.__version__}, Python {platform.python_version()}')")
  else
    info=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)
    info+="; $("$PYTHON" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'torch {torch.__version__} CUDA {torch.version.cuda}, {p.multi_processor_count} SMs')" 2>&1 | tail -1)"
    info+="; $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*')"
  fi
  detail "$info"
}

# One op family's CUDA tests (dry run: its first 2 CPU tests), failures listed by name. -v: a killed step's
# log ends with the test that was running.
run_family_tests() {
  local family=$1 args rc result failed
  if [ "$DRY" = 1 ]; then
    args=$(select_tests "$family" 2)
  else
    args="$(existing ${FAMILY_TESTS[$family]}) -k cuda"
    [ -n "$(select_tests "$family" 1)" ] || args=""
  fi
  if [ -z "$args" ]; then detail "no $(test_expr) tests collected"; return 3; fi
  section "tests: $family" >> "$OUT/tests.log"
  detail "killed before pytest finished: tests.log ends with the test that was running"
  # shellcheck disable=SC2086
  "$PYTHON" -m pytest $args -v -p no:cacheprovider -rfE >> "$OUT/tests.log" 2>&1
  rc=$?
  result=$(tail -1 "$OUT/tests.log" | tr -d '=' | sed 's/^ *//')
  failed=$(sed -n "/tests: $family /,\$p" "$OUT/tests.log" | grep -E "^(FAILED|ERROR) " | cut -d' ' -f2 |
           sed 's/.*:://' | head -8 | tr '\n' ' ')
  detail "$result${failed:+; failed: $failed}"
  [ $rc = 0 ]
}
for f in $FAMILIES; do eval "step_test_$f() { run_family_tests $f; }"; done

# compute-sanitizer over one process that runs the chosen tests (one torch start-up for all), checking
# only vlcore's kernels (their mangled names contain "vlcore").
run_sanitizer() {
  local tool=$1; shift
  local ids="" fam
  for fam in "$@"; do ids+=" $(select_tests "$fam" 1)"; done
  section "compute-sanitizer --tool $tool:$ids" >> "$OUT/sanitizer.log"
  if [ "$DRY" = 1 ]; then
    detail "dry run: skipped (no GPU); would check $(echo $ids | wc -w) tests: $(echo $ids | tr ' ' '\n' | sed 's/.*:://' | cut -c1-40 | tr '\n' ' ')"
    return 0
  fi
  command -v compute-sanitizer > /dev/null || { detail "compute-sanitizer not found"; return 1; }
  local filter=()  # vlcore's kernels alone, where this compute-sanitizer can filter by kernel name
  compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name" && filter=(--kernel-name kns=vlcore)
  # No caching allocator: memcheck then sees each tensor's own bounds.
  # shellcheck disable=SC2086
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 99 \
    --print-limit 20 "$PYTHON" -m pytest $ids -q -p no:cacheprovider >> "$OUT/sanitizer.log" 2>&1
  local rc=$? errors
  errors=$(grep -oE "ERROR SUMMARY: [0-9]+ error|RACECHECK SUMMARY: [0-9]+ hazard[s]? displayed \([0-9]+ error" \
           "$OUT/sanitizer.log" | tail -1)
  detail "$(echo $ids | wc -w) tests, rc $rc${errors:+, $errors}"
  [ $rc = 0 ]
}
step_memcheck() { run_sanitizer memcheck $FAMILIES; }
step_racecheck() { run_sanitizer racecheck attention tome; }

# One benchmark with --check (dry run: --quick --check on the CPU); its rows go to $WORK/bench_<name>.csv.
run_bench() {
  local name=$1 script=benchmarks/bench_$1.py
  [ -f "$script" ] || { detail "no $script"; return 3; }
  if ! grep -q "args.check" "$script"; then
    # On the GPU this fails the check (the full sizes would not fit); the dry run reports it without failing.
    detail "$script has no --check support: not run"; [ "$DRY" = 1 ] && return 3; return 1
  fi
  local flags=(--check --csv "$WORK/bench_$name.csv")
  [ "$DRY" = 1 ] && flags+=(--quick --device cpu)
  section "$script ${flags[*]}" >> "$OUT/bench.log"
  "$PYTHON" "$script" "${flags[@]}" >> "$OUT/bench.log" 2>&1
  local rc=$? rows=0
  [ -f "$WORK/bench_$name.csv" ] && rows=$(($(wc -l < "$WORK/bench_$name.csv") - 1))
  detail "$rows rows$([ $rc = 0 ] || echo ", exit $rc: $(tail -1 "$OUT/bench.log")")"
  [ $rc = 0 ]
}
for b in $BENCHES; do eval "step_bench_$b() { run_bench $b; }"; done

# SASS of the built extension: per kernel family, the instructions the kernels were written to use.
step_sass() {
  local so
  so=$("$PYTHON" -c "import vlcore._C as c; print(c.__file__)" 2>/dev/null)
  if [ "$DRY" = 1 ] || ! command -v cuobjdump > /dev/null || [ -z "$so" ]; then
    detail "skipped: $([ "$DRY" = 1 ] && echo "dry run, no CUDA build" || echo "no cuobjdump or no build")"
    echo "SASS check skipped" > "$OUT/sass.txt"; return 3
  fi
  cuobjdump -sass "$so" > "$WORK/vlcore.sass" 2>&1 || { detail "cuobjdump failed"; return 1; }
  "$PYTHON" - "$WORK/vlcore.sass" > "$OUT/sass.txt" <<'EOF'
import re, sys
# Instruction counts per family (the family is read off the kernel's mangled name, which holds the source
# file's name for kernels in an anonymous namespace).
families = {"seq_pack": ("seq_pack", "seq_unpack", "scatter_image", "image_row_map"),
            "attention": ("attention", "attn"), "tome": ("tome",),
            "token_grid": ("token_grid", "token_pool", "patch_merge"), "nvfp4": ("nvfp4", "hadamard")}
ops = {"LDGSTS (cp.async)": r"\bLDGSTS", "LDSM (ldmatrix)": r"\bLDSM", "HMMA": r"\bHMMA", "HGMMA": r"\bHGMMA",
       "LDG.E.128": r"\bLDG\.E\.128", "STG.E.128": r"\bSTG\.E\.128", "LDL/STL (spills)": r"\b(LDL|STL)\b"}
counts, kernels, family = {}, {}, None
for line in open(sys.argv[1], errors="replace"):
    m = re.search(r"Function : (\S+)", line)
    if m:
        name = m.group(1).lower()
        family = next((f for f, keys in families.items() if any(k in name for k in keys)), "other")
        kernels[family] = kernels.get(family, 0) + 1
        continue
    if family:
        for op, pattern in ops.items():
            if re.search(pattern, line):
                counts[family, op] = counts.get((family, op), 0) + 1
print(f"{'family':14} {'kernels':>7} " + " ".join(f"{op:>17}" for op in ops))
for f in sorted(kernels):
    print(f"{f:14} {kernels[f]:7} " + " ".join(f"{counts.get((f, op), 0):17}" for op in ops))
EOF
  detail "$(awk 'NR > 1 {k += $2} END {print k " kernels"}' "$OUT/sass.txt"); table in sass.txt"
}

# ---------------------------------------------------------------------------------------------------------
if [ -n "$STEP" ]; then
  "step_$STEP"
  exit $?
fi

needs_build() { case $1 in collect|test_*|memcheck|racecheck|bench_*|sass) return 0 ;; *) return 1 ;; esac; }
in_subset() { [ -z "${DEVICE_CHECK_STEPS:-}" ] || [[ " $DEVICE_CHECK_STEPS budget_probe " == *" $1 "* ]]; }

start=$SECONDS
rm -f "$OUT"/{summary.txt,build.log,tests.log,sanitizer.log,bench.csv,bench.log,sass.txt}
declare -a rows
build_ok=1
bad=0
for name in $ORDER; do
  in_subset "$name" || continue
  shares=0 here=0  # the shares of this step and the ones after it
  for other in $ORDER; do
    [ "$other" = "$name" ] && here=1
    [ "$here" = 1 ] && in_subset "$other" && shares=$((shares + SHARE[$other]))
  done
  left=$((BUDGET - GRACE - (SECONDS - start)))
  allow=$(( shares > 0 ? left * SHARE[$name] / shares : left ))
  [ "$name" = budget_probe ] && allow=3
  if needs_build "$name" && [ $build_ok = 0 ]; then
    rows+=("$name|skipped|0|0|the CUDA build failed"); continue
  fi
  if [ $allow -lt 3 ]; then
    rows+=("$name|SKIPPED|0|$((allow < 0 ? 0 : allow))|no budget left"); bad=1; continue
  fi
  t0=$SECONDS
  rm -f "$WORK/detail.$name"
  DEVICE_CHECK_WORK=$WORK timeout --kill-after=5 "$allow" bash "$SELF" --step "$name" > "$WORK/step.$name.log" 2>&1
  rc=$?
  took=$((SECONDS - t0))
  info=$(cat "$WORK/detail.$name" 2>/dev/null || tail -1 "$WORK/step.$name.log")
  case $rc in
    0) status=ok ;;
    3) status=skipped ;;
    124|137) status=KILLED; info="over its ${allow} s slice, killed; ${info}" ;;
    *) status=FAILED ;;
  esac
  if [ "$name" = budget_probe ]; then
    # The probe must be killed; anything else means the budget is not enforced.
    if [ "$status" = KILLED ]; then status=ok; info="killed at its 3 s slice as intended (budget enforced)"
    else status=FAILED; info="not killed (rc $rc): the budget is not enforced"; fi
  fi
  [ "$name" = build ] && [ "$status" != ok ] && build_ok=0
  case $status in ok|skipped) ;; *) bad=1; tail -5 "$WORK/step.$name.log" ;; esac
  rows+=("$name|$status|$took|$allow|$info")
done

# Every benchmark row in one CSV (one header: the benches share common.Row's schema).
first=1
for csv in "$WORK"/bench_*.csv; do
  [ -f "$csv" ] || continue
  if [ $first = 1 ]; then cat "$csv"; first=0; else tail -n +2 "$csv"; fi
done > "$OUT/bench.csv"

total=$((SECONDS - start))
{
  echo "================================ vlcore device check$([ "$DRY" = 1 ] && echo " (DRY RUN, CPU)") ================================"
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ)  commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)  budget ${BUDGET} s"
  printf '%-18s %-8s %6s %7s  %s\n' step status "s" "slice" detail
  for row in "${rows[@]}"; do
    IFS='|' read -r n s t a d <<< "$row"
    printf '%-18s %-8s %6s %7s  %s\n' "$n" "$s" "$t" "$a" "$d"
  done
  echo "total: ${total} s of the ${BUDGET} s budget ($((100 * total / BUDGET)) %)$([ $bad = 0 ] && echo ", every step ok" || echo ", NOT all ok")"
  lines=$(wc -l < "$OUT/bench.csv")
  echo "benchmark rows: $((lines > 0 ? lines - 1 : 0)) in bench.csv; tables in bench.log; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
} > "$OUT/summary.txt"
# The benches' own tables, then the summary, last.
[ -f "$OUT/bench.log" ] && sed -n '/^## /,/^$/p' "$OUT/bench.log" | grep -v "^$" | head -150
echo
cat "$OUT/summary.txt"
[ -n "${DEVICE_CHECK_WORK_KEEP:-}" ] || rm -rf "$WORK"
exit $bad
