#!/usr/bin/env bash
# The GPU job, in parts that each finish in under 8 minutes on an H100 (GPU runs here
# are limited to 10 minutes each), or all of them in turn (the Docker image's default).
#
#   bash bench/run_gpu.sh OUT_DIR [PART...]      PART: all (default) or any of
#     gpu-small       tests/test_gpu.py without the 2^20+3-element layouts
#     gpu-large-f32   tests/test_gpu.py, 2^20+3 elements, float32
#     gpu-large-f64   tests/test_gpu.py, 2^20+3 elements, float64
#     suite           every other test (host build, emulator, properties on the GPU...)
#     bench-small     python -m fusedopt bench, sizes 2^16..2^22
#     bench-large     python -m fusedopt bench, sizes 2^24..2^28
#
# Each test part writes OUT_DIR/gpu-tests-<part>.xml; a bench part embeds the counts of
# every test part run so far and writes its record under OUT_DIR/<part>/.
set -uo pipefail
out="${1:-bench/results}"
shift || true
parts=("$@")
if [ ${#parts[@]} -eq 0 ] || [ "${parts[0]}" = "all" ]; then
    parts=(gpu-small gpu-large-f32 gpu-large-f64 suite bench-small bench-large)
fi
mkdir -p "$out"

tests() {  # tests <part> <pytest arguments...>
    local part="$1"
    shift
    python -m pytest -q -p no:cacheprovider --junitxml="$out/gpu-tests-$part.xml" "$@"
}

bench() {  # bench <part> <sizes>: the test counts of every part run so far go in the record
    python - "$out" > "$out/gpu-tests.json" <<'PY'
import glob, json, sys
import xml.etree.ElementTree as ET
total = {"passed": 0, "failed": 0, "skipped": 0}
for path in glob.glob(f"{sys.argv[1]}/gpu-tests-*.xml"):
    root = ET.parse(path).getroot()
    for s in [root] if root.tag == "testsuite" else root.findall("testsuite"):
        n, bad, skipped = (int(s.get(k, 0)) for k in ("tests", "failures", "skipped"))
        bad += int(s.get("errors", 0))
        total["passed"] += n - bad - skipped
        total["failed"] += bad
        total["skipped"] += skipped
print(json.dumps(total))
PY
    python -m fusedopt bench --device gpu --sizes "$2" --tests "$out/gpu-tests.json" \
        --out "$out/$1" --quiet
}

status=0
for part in "${parts[@]}"; do
    case "$part" in
        gpu-small) tests "$part" tests/test_gpu.py -k "not n1048579" ;;
        gpu-large-f32) tests "$part" tests/test_gpu.py -k "n1048579 and f32" ;;
        gpu-large-f64) tests "$part" tests/test_gpu.py -k "n1048579 and f64" ;;
        suite) tests "$part" tests --ignore=tests/test_gpu.py ;;
        bench-small) bench "$part" 16-22 ;;
        bench-large) bench "$part" 24-28 ;;
        *) echo "unknown part: $part" >&2; false ;;
    esac
    code=$?
    if [ "$code" -ne 0 ] && [ "$status" -eq 0 ]; then status=$code; fi
done
exit "$status"
