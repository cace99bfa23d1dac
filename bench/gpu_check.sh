#!/usr/bin/env bash
# The GPU checks of the cuda backend in one command (at most ~8 minutes on an H200), from the repo root:
#
#   bash bench/gpu_check.sh                 # on a GPU machine: versions, install, CUDA tests, sanitizers, benchmark
#   bash bench/gpu_check.sh --dry-run       # no GPU: the same stages in Numba's simulator, tiny shapes, no sanitizer
#   bash bench/gpu_check.sh --stages "pytest bench"     # only some stages (env and install always run)
#
# Stages, each under its own `timeout`, each run whatever the previous ones did:
#   env        numba, numba-cuda, CuPy, PyTorch, driver and GPU versions; CUDA_HOME set if unset and findable
#   install    relprop from this working tree without dependencies (pip -e; PYTHONPATH as well); wheels in .whl/
#   pytest     the CUDA tests on CuPy arrays: pytest -m cuda (no simulator), including tests/test_cuda_ptx.py
#   memcheck   compute-sanitizer memcheck over bench/gpu_sanitize.py (every kernel family once; CuPy's memory
#              pool off so an access past an array's end leaves its allocation; also with tiny launches)
#   racecheck  compute-sanitizer racecheck over the same run
#   initcheck  compute-sanitizer initcheck (reads of never-written device memory) over the same run
#   bench      bench/gpu.py: VGG-16 at batch 32 against PyTorch and Zennit on the GPU, kernel families against
#              cuBLAS SGEMM and a device-to-device copy; ResNet-18 at batch 64 once relprop.from_torch exists
# then a summary. Everything lands in $OUT (default ./gpu_out): check.log (all of it), pytest.log, memcheck.log,
# racecheck.log, initcheck.log, gpu.log and gpu.json -- 7 files, within the device tool's 8.
#
# Python packages the GPU machine lacks travel as wheels in a folder .whl/ at the repo root, installed from there
# when present (the device tool's notes: /work/.library/device/README.md). Zennit (pure Python; its needs --
# torch, torchvision, numpy, click, Pillow -- are on the nvidia-h200 image) is fetched here, once, with:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl zennit==0.5.1
# and the device call names it: run(command="bash bench/gpu_check.sh", timeout_s=540, carry=[".whl"]).
#
# Stage time limits (seconds) can be changed through the environment: T_INSTALL, T_PYTEST, T_MEMCHECK,
# T_RACECHECK, T_INITCHECK, T_BENCH. Exit status: 0 when every stage that ran passed, 1 otherwise.
set -u
set -o pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
STAGES="pytest memcheck racecheck initcheck bench"
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --stages) shift; STAGES="${1:-}" ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (try --help)"; exit 2 ;;
    esac
    shift
done

OUT="${OUT:-$ROOT/gpu_out}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/check.log") 2>&1
TEE_PID=$!
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if [ "$DRY" = 1 ]; then
    export NUMBA_ENABLE_CUDASIM=1                    # no GPU: Numba's simulator, NumPy arrays
    d_pytest=600 d_bench=300                         # the simulator is slow; there is no 8-minute budget here
else
    unset NUMBA_ENABLE_CUDASIM                       # the real GPU, CuPy arrays
    d_pytest=140 d_bench=150
fi
T_INSTALL="${T_INSTALL:-45}" T_PYTEST="${T_PYTEST:-$d_pytest}" T_MEMCHECK="${T_MEMCHECK:-60}"
T_RACECHECK="${T_RACECHECK:-40}" T_INITCHECK="${T_INITCHECK:-30}" T_BENCH="${T_BENCH:-$d_bench}"
T0=$(date +%s)
SUMMARY=()

want() { case " $STAGES " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

# stage NAME LIMIT_S LOGFILE COMMAND...: run under timeout, tee into LOGFILE, record the outcome
stage() {
    local name=$1 limit=$2 log=$3; shift 3
    echo
    echo "=== [$name] limit ${limit}s: $*"
    local t0 rc status
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    case $rc in
        0) status=PASS ;;
        124|137) status=TIMEOUT ;;
        *) status=FAIL ;;
    esac
    SUMMARY+=("$(printf '%-10s %-8s rc=%-4s %4ss  %s' "$name" "$status" "$rc" "$(( $(date +%s) - t0 ))" "$log")")
}

skip() { SUMMARY+=("$(printf '%-10s %-8s %s' "$1" SKIP "$2")"); echo; echo "=== [$1] skipped: $2"; }

# ---------------------------------------------------------------------------------------------- env
echo "=== [env] $(date -u +%FT%TZ) on $(uname -n) ($(uname -m)); dry run: $DRY; OUT=$OUT"
if [ -z "${CUDA_HOME:-}" ]; then
    nvcc_dir=$(dirname "$(dirname "$(readlink -f "$(command -v nvcc 2>/dev/null || echo /nonexistent/bin/nvcc)")")")
    for c in "$nvcc_dir" /usr/local/cuda /usr/local/cuda-13* /usr/local/cuda-12* /opt/cuda; do
        # a toolkit with NVVM and libdevice (what numba-cuda compiles with)
        if [ -d "$c/nvvm/libdevice" ]; then export CUDA_HOME="$c" CUDA_PATH="$c"; break; fi
    done
fi
echo "CUDA_HOME=${CUDA_HOME:-<unset: numba-cuda looks for NVVM in the pip nvidia-* wheels>}"
SANITIZER=$(command -v compute-sanitizer 2>/dev/null || true)
for c in "${CUDA_HOME:-/nonexistent}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
         /usr/local/cuda/compute-sanitizer/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$c" ] && SANITIZER=$c
done
echo "compute-sanitizer: ${SANITIZER:-<not found>}"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv 2>&1 | head -5
else
    echo "nvidia-smi: <not found>"
fi
command -v nvcc >/dev/null 2>&1 && nvcc --version | tail -2
[ -n "$SANITIZER" ] && "$SANITIZER" --version | tail -1
"$PY" - <<'EOF'
import importlib.metadata as md, platform
def v(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return "-"
print("python", platform.python_version(), "| numpy", v("numpy"), "| numba", v("numba"),
      "| numba-cuda", v("numba-cuda"), "| cupy", v("cupy-cuda13x"), v("cupy-cuda12x"), "| torch", v("torch"),
      "| torchvision", v("torchvision"), "| zennit", v("zennit"), "| pytest", v("pytest"),
      "| hypothesis", v("hypothesis"))
try:
    import cupy
    rt = cupy.cuda.runtime
    props = rt.getDeviceProperties(0)
    print("cupy sees", props["name"], "cc", cupy.cuda.Device(0).compute_capability, "| driver", rt.driverGetVersion(),
          "| runtime", rt.runtimeGetVersion(), "| SMs", props["multiProcessorCount"])
except Exception as exc:
    print("cupy: no GPU:", type(exc).__name__, str(exc)[:120])
try:
    import torch
    print("torch cuda", torch.version.cuda, "| available", torch.cuda.is_available())
except Exception as exc:
    print("torch:", type(exc).__name__, str(exc)[:120])
EOF

# ---------------------------------------------------------------------------------------------- install
echo
echo "=== [install]"
if ls .whl/*.whl >/dev/null 2>&1; then
    echo "wheels from .whl: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"   # the working tree's relprop in every case
if [ "$DRY" = 0 ]; then
    timeout "$T_INSTALL" "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
        || echo "pip install -e . failed or timed out: relprop comes from PYTHONPATH=$ROOT"
fi
"$PY" -c "import relprop; print('relprop', relprop.__version__, 'from', relprop.__file__)"

# ---------------------------------------------------------------------------------------------- stages
if want pytest; then
    if [ "$DRY" = 1 ]; then  # a quick selection in the simulator (CI runs the whole simulator suite)
        stage pytest "$T_PYTEST" "$OUT/pytest.log" env RELPROP_HYPOTHESIS_PROFILE=cudasim "$PY" -m pytest -m cuda \
            -q -p no:cacheprovider -rfEs tests/test_cuda_kernels.py tests/test_cuda_ptx.py \
            -k "conv2d or sum_outer or tf32"
    else
        extra=()
        "$PY" -c "import pytest_timeout" 2>/dev/null && extra=(--timeout=120)
        stage pytest "$T_PYTEST" "$OUT/pytest.log" env RELPROP_HYPOTHESIS_PROFILE=ci "$PY" -m pytest -m cuda \
            -q -p no:cacheprovider -rfEs --durations=15 "${extra[@]}" tests
    fi
fi

for tool in memcheck racecheck initcheck; do
    want $tool || continue
    case $tool in
        memcheck) limit=$T_MEMCHECK; args=(--tool memcheck --leak-check no); script=(--no-pool --small-launches) ;;
        racecheck) limit=$T_RACECHECK; args=(--tool racecheck --racecheck-report all); script=() ;;
        initcheck) limit=$T_INITCHECK; args=(--tool initcheck); script=(--no-pool) ;;
    esac
    cmd=("$SANITIZER" "${args[@]}" --error-exitcode 1 --print-limit 30 "$PY" bench/gpu_sanitize.py "${script[@]}")
    if [ "$DRY" = 1 ]; then
        if [ $tool = memcheck ]; then  # the script itself, in the simulator, once
            stage "$tool" 300 "$OUT/$tool.log" "$PY" bench/gpu_sanitize.py "${script[@]}"
        else
            skip $tool "dry run (would run: compute-sanitizer ${args[*]} ... bench/gpu_sanitize.py ${script[*]})"
        fi
    elif [ -z "$SANITIZER" ]; then
        skip $tool "compute-sanitizer not found"
    else
        stage "$tool" "$limit" "$OUT/$tool.log" "${cmd[@]}"
    fi
done

if want bench; then
    if [ "$DRY" = 1 ]; then
        stage bench "$T_BENCH" "$OUT/gpu.log" "$PY" bench/gpu.py --quick --json "$OUT/gpu.json"
    else
        stage bench "$T_BENCH" "$OUT/gpu.log" "$PY" bench/gpu.py --json "$OUT/gpu.json" --budget-s $(( T_BENCH - 35 ))
    fi
fi

# ---------------------------------------------------------------------------------------------- summary
echo
echo "=== summary ($(( $(date +%s) - T0 ))s in all; dry run: $DRY)"
failed=0
for line in "${SUMMARY[@]}"; do
    echo "  $line"
    case "$line" in *" FAIL "*|*" TIMEOUT "*) failed=1 ;; esac
done
if [ -f "$OUT/gpu.json" ]; then
    "$PY" - "$OUT/gpu.json" <<'EOF'
import json, sys
d = json.load(open(sys.argv[1]))
c = d.get("ceilings", {})
if c:
    print(f"  ceilings: SGEMM {c['sgemm_flops'] / 1e12:.2f} TFLOP/s, copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s")
for net, r in d.get("nets", {}).items():
    for m, row in r.get("methods", {}).items():
        peer = (f"; {row['peer']} / relprop = {row['peer_over_relprop']:.2f}" if "peer_over_relprop" in row else "")
        print(f"  {net} b{r['batch']} {m}: {row['relprop_ms']:.2f} ms, {row['images_per_s']:.0f} images/s{peer}")
for k, v in d.get("aims", {}).items():
    print(f"  aim {k}: measured {v['measured']}, aim {v['aim']}")
for e in d.get("errors", []):
    print(f"  bench error: {e}")
EOF
fi
exec >&- 2>&-
wait "$TEE_PID" 2>/dev/null || sleep 1   # let tee finish check.log before the machine collects $OUT
exit $failed
