#!/usr/bin/env bash
# One GPU session: every GPU test (pytest -m gpu: tests/gpu/ and tests/test_cuda_graphs.py), then
# benchmark cases of bench/cases.py; everything lands in $OUT (default ./bench-out).
#
#   bench/gpu_session.sh                    # the tests, then python -m bench quick
#   bench/gpu_session.sh dev families       # the tests, then these cases or groups (python -m bench --list)
#   BENCH_TESTS=0 bench/gpu_session.sh dev  # the benchmarks only
#   BENCH_CASES=0 bench/gpu_session.sh      # the tests only
#   BENCH_TEST_FILES=tests/gpu/test_gpu_gluon_specs.py bench/gpu_session.sh gluon-wired
#
# Exits 1 when a test failed or attncc failed in a benchmark case; the other part still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TRITON_INTERPRET=0
OUT="${OUT:-$PWD/bench-out}"
mkdir -p "$OUT"
status=0
if [ "${BENCH_TESTS:-1}" != 0 ]; then
    # one test per line (-v), so that a call cut by the device's time limit still names what passed;
    # several workers (the image has pytest-xdist and pytest-timeout): serially it takes over 10 minutes
    # on an H200, mostly Triton compiling. BENCH_TEST_FILES narrows it (e.g. tests/gpu/test_gpu_gluon_specs.py).
    # shellcheck disable=SC2086
    python -m pytest -m gpu ${BENCH_TEST_FILES:-tests} ${BENCH_TEST_ARGS:--n 6 --dist loadfile -v -rfE --tb=short --timeout 300} \
        -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1 || status=1
    grep -E "^(FAILED|ERROR) |passed|failed" "$OUT/gpu_tests.log" | tail -40
fi
if [ "${BENCH_CASES:-1}" != 0 ]; then
    if [ $# -eq 0 ]; then set -- quick; fi
    python -m bench "$@" --out "$OUT" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status
