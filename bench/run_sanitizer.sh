#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over every fusedopt kernel (bench/sanitize.py),
# on a GPU. Writes <OUT>/sanitizer-<tool>.log and <OUT>/<date>-sanitizer.json.
# Usage: bash bench/run_sanitizer.sh [OUT_DIR]
set -uo pipefail
out="${1:-bench/results}"
mkdir -p "$out"
declare -A status
for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 99 --print-limit 50 \
        python bench/sanitize.py > "$out/sanitizer-$tool.log" 2>&1
    status[$tool]=$?
    tail -3 "$out/sanitizer-$tool.log"
done
python - "$out" "${status[memcheck]}" "${status[racecheck]}" <<'PY'
import datetime, json, re, sys
out, memcheck, racecheck = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def summary(tool, code):
    text = open(f"{out}/sanitizer-{tool}.log").read()
    found = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return {"exit_code": code, "errors": int(found[-1]) if found else None,
            "clean": code == 0 and bool(found) and int(found[-1]) == 0}
import cupy
props = cupy.cuda.runtime.getDeviceProperties(0)
record = {"device": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
          "date": datetime.date.today().isoformat(),
          "versions": {"cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()},
          "memcheck": summary("memcheck", memcheck), "racecheck": summary("racecheck", racecheck)}
path = f"{out}/{record['date']}-sanitizer.json"
open(path, "w").write(json.dumps(record, indent=1) + "\n")
print(json.dumps(record))
PY
exit $(( status[memcheck] != 0 ? status[memcheck] : status[racecheck] ))
