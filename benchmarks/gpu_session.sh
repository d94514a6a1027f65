#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one command: build, the CUDA tests, compute-sanitizer
# (memcheck / racecheck / initcheck) over the ops, the CUDA-graph paths (attacks and smoothing), the
# sequential engine and the Langevin step, then benchmarks and their plots; logs under $OUT and a
# summary block at the end, one PASS / FAIL / SKIP line per check. From the repository root:
#     bash benchmarks/gpu_session.sh
# A device command may run 10 minutes, so the stages share a deadline (GPU_SESSION_BUDGET_S, default
# 570 s): each runs under `timeout` for at most what is left, in order of importance, and a stage
# that no longer fits is reported as SKIP. FULL_TESTS=1 runs the whole test suite instead of the CUDA
# tests (the CPU tests run in CI); SANITIZE=0 / BENCH=0 leave those stages out.
set -uo pipefail
OUT="${OUT:-/tmp/robustops-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
BUDGET="${GPU_SESSION_BUDGET_S:-570}"
START=$SECONDS
SUMMARY=()

left() { echo $((BUDGET - (SECONDS - START))); }

# note CHECK LABEL VERDICT SECONDS: one line of the summary block.
note() {
  SUMMARY+=("$(printf '%-10s %-40s %s (%ss)' "$1" "$2" "$3" "$4")")
  printf '%-10s %-40s %s (%ss)\n' "$1" "$2" "$3" "$4" | tee -a "$OUT/gpu.txt"
}

# budget CAP: the seconds a stage may take (at most CAP, at most what is left); 0 when under 30 s are left.
budget() {
  local l; l=$(left)
  if [ "$l" -lt 30 ]; then echo 0; elif [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi
}

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
t0=$SECONDS
if FORCE_CUDA=1 timeout "$(budget 300)" python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1; then
  note build "pip install -e . (FORCE_CUDA=1)" PASS $((SECONDS - t0))
else
  note build "pip install -e . (FORCE_CUDA=1)" FAIL $((SECONDS - t0))
  tail -40 "$OUT/build.log"
  exit 1
fi
python3 -c "import robustops; print(robustops.build_info())" | tee -a "$OUT/gpu.txt"

# ------------------------------------------------------------------------------------ tests
# kornia (the blur, spatter and JPEG corruptions, AugMix's ops) is not on the machine, which has no
# internet: `make gpu-wheels` downloads its wheels and the device call carries gpu-wheels/. Without them
# the tests needing kornia skip, and so do those corruptions in the CPU = CUDA tests.
if ls gpu-wheels/*.whl > /dev/null 2>&1; then
  t0=$SECONDS
  if python3 -m pip install --no-deps gpu-wheels/*.whl > "$OUT/gpu-wheels.log" 2>&1; then
    note wheels "pip install gpu-wheels/*.whl" PASS $((SECONDS - t0))
  else
    note wheels "pip install gpu-wheels/*.whl" "FAIL (see gpu-wheels.log; kornia tests skip)" $((SECONDS - t0))
  fi
else
  note wheels "gpu-wheels/*.whl" "SKIP (none: make gpu-wheels, carry gpu-wheels)" 0
fi
python3 -c "import kornia; print('kornia', kornia.__version__)" 2>&1 | tail -1 | tee -a "$OUT/gpu.txt"

# -m cuda: every CUDA-marked test, the corruptions' CPU = CUDA tests (tests/test_corruptions_*.py) included
t0=$SECONDS
tests=(-m cuda)
[ "${FULL_TESTS:-0}" = 1 ] && tests=()
cap=$(budget 180)
if [ "$cap" -eq 0 ]; then
  note pytest "tests ${tests[*]}" "SKIP (no time left)" 0
elif timeout "$cap" python3 -m pytest tests -q -x -p no:cacheprovider "${tests[@]}" > "$OUT/tests.log" 2>&1; then
  note pytest "tests ${tests[*]}" "PASS: $(tail -1 "$OUT/tests.log")" $((SECONDS - t0))
else
  note pytest "tests ${tests[*]}" "FAIL: $(tail -1 "$OUT/tests.log")" $((SECONDS - t0))
fi

# -------------------------------------------------------------------------- compute-sanitizer
# racecheck and initcheck look at robustops' own kernels only (where the tool can filter by kernel
# name): torch's and cuDNN's kernels would cost most of the time and initcheck reports the caching
# allocator's never-written padding in them. memcheck checks every kernel.
FILTER=()
if command -v compute-sanitizer > /dev/null; then
  help=$(compute-sanitizer --help 2>&1)
  if grep -q -- "--kernel-name " <<< "$help"; then
    FILTER=(--kernel-name kns=robustops)
  elif grep -q -- "--kernel-regex" <<< "$help"; then
    FILTER=(--kernel-regex kns=robustops)
  fi
fi
# The 2^31-element tests (4+ GB, minutes under a sanitizer) and torch.compile tests stay out.
NOT_BIG="not 2_31 and not fullgraph and not compile"
OPS=(tests/test_pgd_ops.py tests/test_pgd_paths.py tests/test_smoothing_ops.py tests/test_smoothing_rows.py tests/test_kernel_numerics.py)
GRAPHS=(tests/test_attacks.py tests/test_smoothing.py tests/test_smoothing_pass.py tests/test_graph_capture.py)
ENGINE=(tests/test_sequential.py tests/test_langevin.py)
CORRUPT=(tests/test_corruptions_noise_blur.py tests/test_corruptions_weather_digital.py)

# sanitize TOOL LABEL CAP K-EXPRESSION FILE...: one sanitizer run of the CUDA tests selected.
sanitize() {
  local tool=$1 label=$2 cap=$3 expr=$4
  shift 4
  local log="$OUT/sanitizer-$tool-${label//[^a-zA-Z0-9]/_}.log" t0=$SECONDS filter=() rc errors
  [ "$tool" != memcheck ] && filter=("${FILTER[@]}")
  cap=$(budget "$cap")
  if [ "${SANITIZE:-1}" = 0 ] || ! command -v compute-sanitizer > /dev/null; then
    note "$tool" "$label" "SKIP (SANITIZE=0 or no compute-sanitizer)" 0
    return
  fi
  if [ "$cap" -eq 0 ]; then
    note "$tool" "$label" "SKIP (no time left)" 0
    return
  fi
  timeout "$cap" compute-sanitizer --tool "$tool" --error-exitcode 86 "${filter[@]}" \
    python3 -m pytest -q -x -p no:cacheprovider -k "cuda and ($expr) and $NOT_BIG" "$@" > "$log" 2>&1
  rc=$?
  errors=$(grep -oE "(ERROR|RACECHECK) SUMMARY: [0-9]+" "$log" | tail -1 | grep -oE "[0-9]+$")
  case $rc in
    0) note "$tool" "$label" "PASS: $(grep -E "passed|failed|skipped" "$log" | tail -1)" $((SECONDS - t0)) ;;
    5) note "$tool" "$label" "FAIL (no test selected)" $((SECONDS - t0)) ;;
    86) note "$tool" "$label" "FAIL (${errors:-?} sanitizer errors, see $log)" $((SECONDS - t0)) ;;
    124) if [ "${errors:-0}" = 0 ] && ! grep -q "^=========.*Error\|^=========.*Hazard" "$log"; then
           note "$tool" "$label" "CUT at ${cap}s, no sanitizer error so far ($(grep -cE "PASSED|passed" "$log") lines passed)" \
             $((SECONDS - t0))
         else
           note "$tool" "$label" "FAIL (sanitizer errors before the cut at ${cap}s, see $log)" $((SECONDS - t0))
         fi ;;
    *) note "$tool" "$label" "FAIL (pytest rc=$rc, ${errors:-?} sanitizer errors, see $log)" $((SECONDS - t0)) ;;
  esac
}

# Caps in seconds per run; a run cut by its cap says so (CUT) and what it had checked by then.
for tool in memcheck racecheck initcheck; do
  # racecheck: the kernels with shared memory (the L2 reductions, the vote count) on the ops side
  ops_expr="cuda"
  [ "$tool" = racecheck ] && ops_expr="l2 or count_votes or votes or random_init"
  sanitize "$tool" "pgd/smoothing ops" 120 "$ops_expr" "${OPS[@]}"
  sanitize "$tool" "CUDA-graph paths (attacks, smoothing)" 75 "graph" "${GRAPHS[@]}"
  # test_langevin's 165 CUDA cases: float32 in every shape, and every dtype in channels_last
  sanitize "$tool" "sequential engine, langevin" 60 "not (dtype1 or dtype2) or channels_last" "${ENGINE[@]}"
done
# the corruptions' CPU = CUDA tests: torch's kernels only (racecheck / initcheck look at robustops' own)
sanitize memcheck "corruptions (CPU = CUDA)" 90 "cpu_equals_cuda" "${CORRUPT[@]}"

# ------------------------------------------------------------------------------- benchmarks
# bench CAP LABEL SCRIPT [ARGS...]: one benchmark, appended to bench.log.
bench() {
  local cap t0=$SECONDS label=$2
  cap=$(budget "$1")
  shift 2
  if [ "$cap" -eq 0 ]; then
    note bench "$label" "SKIP (no time left)" 0
    return
  fi
  echo "== $*" >> "$OUT/bench.log"
  if timeout "$cap" python3 "$@" >> "$OUT/bench.log" 2>&1; then
    note bench "$label" PASS $((SECONDS - t0))
  else
    note bench "$label" "FAIL or cut at ${cap}s" $((SECONDS - t0))
  fi
}

if [ "${BENCH:-1}" != 0 ]; then
  for b in benchmarks/bench_*.py; do
    if [ "$b" = benchmarks/bench_certify.py ]; then
      bench 300 "$b" "$b" --no-sequential
    elif [ "$b" = benchmarks/bench_attack.py ]; then
      # autoattack: robustops' AutoAttack vs torchattacks' (PGD-trained PreAct-ResNet-18, 360 points), ~2 min
      bench 300 "$b" "$b" --configs cnn,rn18,apgd,autoattack
    else
      bench 300 "$b" "$b"
    fi
  done
  # sequential vs fixed-n CERTIFY (ResNet-110, random weights): samples saved, wall time, refill efficiency
  bench 400 "bench_certify.py --sequential-only" benchmarks/bench_certify.py --sequential-only
  # every corruption batched on the CPU and the GPU (the imagecorruptions column empty there: not installed)
  bench 120 "corruptions.py --quick --device cuda" benchmarks/corruptions.py --quick --device cuda
  # bench_bounds.py (run by the loop above): its STACKED_CONV line decides bounds.STACKED_CONV["cuda"]
  grep -hE "^(STACKED_CONV\[|target IBP|target radius)" "$OUT/bench.log" | tee -a "$OUT/gpu.txt"
  cp benchmarks/results/*.csv "$OUT/" 2> /dev/null || true
  python3 benchmarks/plot.py --out "$OUT" 2>&1 | tail -5
fi

echo
echo "==================== summary ($((SECONDS - START)) s of a ${BUDGET} s budget; logs in $OUT)"
printf '%s\n' "${SUMMARY[@]}" | tee "$OUT/summary.txt"
