#!/usr/bin/env bash
# The GPU check in one call: every CuPy and dask-cuda path, measured on the hardware.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [--budget SECONDS] [--only STEP,STEP]
#
# From a fresh checkout on the GPU machine, with the wheels of `make gpu-wheels` in .whl/
# (carried by the device call): installs them into a scratch folder with no network,
# then runs the steps of benchmarks/gpu_check.py (environment and import chain, the GPU
# tests, the GFRE, LFRE and featurize benchmarks), each with its own time limit, all
# within --budget seconds (default 480, installation included). A step that fails or
# runs out of time is recorded and the next one runs. Writes $OUT/gpu-check.json (the
# figures, per-test outcomes, targets met) and $OUT/gpu-check.log (every step's output);
# OUT defaults to ./gpu-check-out.
#
# --dry-run: the same steps on the CPU at tiny sizes (numpy instead of CuPy, a
# LocalCluster instead of a LocalCUDACluster) in the current environment; if .whl/
# holds wheels they are installed for Python 3.12 into a scratch folder (not used) to
# prove that they install together. The test suite runs this (tests/test_gpu_check.py).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=""
budget=480
only=()
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry=1 ;;
        --budget) budget="$2"; shift ;;
        --only) only=(--only "$2"); shift ;;
        *) echo "gpu_check.sh: unknown option $1 (use --dry-run, --budget SECONDS, --only STEPS)" >&2
           exit 2 ;;
    esac
    shift
done

started=$(date +%s)
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
log="$out/gpu-check.log"
: > "$log"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
python="${PYTHON:-python3}"
site="$work/site"
pip_install=("$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir
             --upgrade --target "$site")

echo "===== install: wheels of .whl/ into $site" >> "$log"
status=skipped
code=null
reason="no wheels in .whl/ (make gpu-wheels)"
t0=$(date +%s)
if compgen -G ".whl/*.whl" > /dev/null; then
    if [ -z "$dry" ]; then
        timeout 150 "${pip_install[@]}" .whl/*.whl >> "$log" 2>&1
    else
        # for Python 3.12 on manylinux x86_64, as on the GPU machine; not used here
        timeout 150 "${pip_install[@]}" --only-binary=:all: --python-version 3.12 \
            --implementation cp --abi cp312 --abi abi3 --abi none \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
            --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 \
            --platform manylinux1_x86_64 --platform any .whl/*.whl >> "$log" 2>&1 \
        && "$python" benchmarks/gpu_wheels.py check --dest .whl >> "$log" 2>&1
    fi
    code=$?
    if [ "$code" -eq 0 ]; then status=ok; elif [ "$code" -eq 124 ]; then status=timeout; else status=failed; fi
    reason="$(ls .whl/*.whl | wc -l) wheels"
elif [ -z "$dry" ]; then
    status=failed
fi
echo "===== install: $status ($reason) after $(( $(date +%s) - t0 )) s" >> "$log"
printf '{"status": "%s", "returncode": %s, "seconds": %s, "detail": "%s"}\n' \
    "$status" "$code" "$(( $(date +%s) - t0 ))" "$reason" > "$work/install.json"

if [ -z "$dry" ]; then
    export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$python" benchmarks/gpu_check.py run --out "$out" --work "$work" --started "$started" \
    --budget "$budget" --install "$work/install.json" ${dry:+--dry-run} "${only[@]}"
