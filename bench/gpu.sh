#!/usr/bin/env bash
# On a lent GPU machine (H100/H200; torch 2.11, triton 3.6, transformers 5.17, no trl/datasets):
# rebuild the CPU library against that torch, run the test suite on CUDA (Triton for real, not
# interpreted), run every benchmark's CUDA variant, and print the lines for bench/RESULTS.md.
#
#   here, once:      bash bench/gpu.sh wheels     # downloads trl + datasets wheels into .whl/ (ignored)
#   on the device:   bash bench/gpu.sh            # run with carry=[".whl"]; logs land in $OUT
#                    bash bench/gpu.sh tests      # only the rebuild and the test suite (one call each
#                    bash bench/gpu.sh bench      # fits the device tool's 10-minute limit on a call)
#   anywhere:        bash bench/gpu.sh --dry-run  # the same steps on a CPU machine (CI runs it): the
#                                                 # rebuild for real, the CUDA tests and benchmarks
#                                                 # collected and reported as skipped
# The benchmarks run their CUDA variants only (-k cuda): the CPU ones are measured on the CPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
if [ "${1:-}" = "--dry-run" ]; then
  dry=1
  shift
fi

if [ "${1:-}" = "wheels" ]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  for pkg in trl==1.16.0 datasets dill multiprocess; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$pkg"
  done
  ls -la .whl
  exit 0
fi

part=${1:-all}
case "$part" in all|tests|bench) ;; *) echo "usage: bash bench/gpu.sh [--dry-run] [wheels|all|tests|bench]" >&2; exit 2;; esac
OUT=${OUT:-/tmp/saliency-r1-gpu}
mkdir -p "$OUT"
if [ "$dry" = 0 ] && ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
if [ "$dry" = 1 ]; then
  echo "dry run on $(uname -m), no GPU: CUDA-only tests and benchmarks are collected and skipped"
  # Only the CUDA variants, as on the device; on the CPU they report themselves skipped.
  test_selection=(-m "not slow" -k cuda)
else
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  test_selection=()
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, '| CUDA', torch.cuda.is_available())"

export PYTHONUNBUFFERED=1
tests_rc=0 bench_rc=0
if [ "$part" = all ] || [ "$part" = tests ]; then
  python3 -m pytest -q -p no:cacheprovider -rs tests "${test_selection[@]}" 2>&1 | tee "$OUT/tests.log" | tail -25
  tests_rc=${PIPESTATUS[0]}
fi
if [ "$part" = all ] || [ "$part" = bench ]; then
  python3 -m pytest -q -p no:cacheprovider -rs bench --benchmark-only -k cuda --benchmark-json="$OUT/bench.json" 2>&1 \
    | tee "$OUT/bench.log" | tail -40
  bench_rc=${PIPESTATUS[0]}
  echo "== lines for bench/RESULTS.md =="
  grep -E '^\| 20[0-9]{2}-' "$OUT/bench.log"
fi
if [ "$dry" = 1 ]; then
  # Collected and skipped is the expected outcome without a GPU; an error or failure is not.
  for log in "$OUT/tests.log" "$OUT/bench.log"; do
    [ -f "$log" ] && grep -qE "[0-9]+ skipped" "$log" && ! grep -qE "[0-9]+ (failed|error)" "$log" \
      || { echo "dry run: $log shows no skipped CUDA items, or a failure"; exit 1; }
  done
  # pytest exits 5 when every selected item was deselected; here they are skipped (0).
fi
echo "tests rc=$tests_rc bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
