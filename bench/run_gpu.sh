#!/usr/bin/env bash
# The GPU job (the Docker image's default command, and what runs on a lent GPU):
# the whole test suite, then the benchmark, which embeds the test counts in its
# record. Usage: bash bench/run_gpu.sh [OUT_DIR] [extra pytest arguments...]
set -uo pipefail
out="${1:-bench/results}"
shift || true
mkdir -p "$out"
python -m pytest tests -q -p no:cacheprovider --junitxml="$out/gpu-tests.xml" "$@"
tests_status=$?
python -m fusedopt bench --device gpu --tests "$out/gpu-tests.xml" --out "$out"
bench_status=$?
exit $(( tests_status != 0 ? tests_status : bench_status ))
