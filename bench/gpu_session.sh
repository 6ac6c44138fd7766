#!/usr/bin/env bash
# One GPU session: every GPU test (pytest -m gpu: tests/gpu/ and tests/test_cuda_graphs.py), then
# benchmark cases of bench/cases.py; everything lands in $OUT (default ./bench-out).
#
#   bench/gpu_session.sh                    # the tests, then python -m bench quick
#   bench/gpu_session.sh dev families       # the tests, then these cases or groups (python -m bench --list)
#   BENCH_TESTS=0 bench/gpu_session.sh dev  # the benchmarks only
#   BENCH_CASES=0 bench/gpu_session.sh      # the tests only
#
# Exits 1 when a test failed or attncc failed in a benchmark case; the other part still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
status=0
if [ "${BENCH_TESTS:-1}" != 0 ]; then
    python -m pytest -q -m gpu tests --junitxml "$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" || status=1
fi
if [ "${BENCH_CASES:-1}" != 0 ]; then
    if [ $# -eq 0 ]; then set -- quick; fi
    python -m bench "$@" --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status
