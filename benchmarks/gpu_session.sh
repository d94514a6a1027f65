#!/usr/bin/env bash
# Everything a lent GPU machine should run, in one command (build, CUDA tests, compute-sanitizer
# memcheck / racecheck / initcheck, benchmarks and their plots), with logs under $OUT. From the
# repository root on the device machine:
#     bash benchmarks/gpu_session.sh
set -uo pipefail
OUT="${OUT:-/tmp/robustops-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
FORCE_CUDA=1 python3 -m pip install --no-build-isolation --no-deps -e . > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
python3 -c "import robustops; print(robustops.build_info())" | tee -a "$OUT/gpu.txt"
python3 -m pytest tests -q -x 2>&1 | tee "$OUT/tests.log" | tail -5
compute-sanitizer --tool memcheck --error-exitcode 1 python3 -m pytest -q -x -k "cuda and not 2_31" \
  tests/test_pgd_ops.py tests/test_smoothing_ops.py tests/test_kernel_numerics.py > "$OUT/memcheck.log" 2>&1; echo "memcheck rc=$?" | tee -a "$OUT/gpu.txt"
compute-sanitizer --tool racecheck --error-exitcode 1 python3 -m pytest -q -x -k "cuda and (l2 or count_votes) and not 2_31" \
  tests/test_pgd_ops.py tests/test_smoothing_ops.py tests/test_kernel_numerics.py > "$OUT/racecheck.log" 2>&1; echo "racecheck rc=$?" | tee -a "$OUT/gpu.txt"
compute-sanitizer --tool initcheck --error-exitcode 1 python3 -m pytest -q -x -k "cuda and not 2_31" \
  tests/test_pgd_ops.py tests/test_smoothing_ops.py tests/test_kernel_numerics.py > "$OUT/initcheck.log" 2>&1; echo "initcheck rc=$?" | tee -a "$OUT/gpu.txt"
for b in benchmarks/bench_*.py; do
  echo "== $b" | tee -a "$OUT/bench.log"
  extra=""; [ "$b" = benchmarks/bench_certify.py ] && extra="--no-sequential"
  timeout 300 python3 "$b" $extra 2>&1 | tee -a "$OUT/bench.log" | tail -30
done
# sequential vs fixed-n CERTIFY (ResNet-110, random weights): samples saved, wall time, refill efficiency
echo "== benchmarks/bench_certify.py --sequential-only" | tee -a "$OUT/bench.log"
timeout 400 python3 benchmarks/bench_certify.py --sequential-only 2>&1 | tee -a "$OUT/bench.log" | tail -30
# bench_bounds.py (run by the loop above): its STACKED_CONV line decides bounds.STACKED_CONV["cuda"]
grep -hE "^(STACKED_CONV\[|target IBP|target radius)" "$OUT/bench.log" | tee -a "$OUT/gpu.txt"
cp benchmarks/results/*.csv "$OUT/" 2>/dev/null || true
python3 benchmarks/plot.py --out "$OUT" 2>&1 | tail -5
