#!/usr/bin/env bash
# The GPU acceptance check of issue 9 on a bare GPU machine, in at most 8 minutes (benchmarks/gpu_check.py says what
# it runs). Rows, log and the CUDA tests' JUnit report go to OUTDIR (default: $OUT, the `run` tool's folder).
#   benchmarks/gpu_check.sh [OUTDIR]
#   benchmarks/gpu_check.sh --cpu-smoke OUTDIR     the same code paths on the CPU with the demo model (CI runs this)
# The machine has no network: packages it lacks travel as wheels in .whl/ (benchmarks/gpu_wheels.sh fills it) and
# are installed into /tmp/site here. PYTHON picks the interpreter (default python3, the one with torch there).
set -uo pipefail
cd "$(dirname "$0")/.."
smoke=()
# the smoke run's tensors are tiny: one thread each beats OpenMP's fork and join, most of all on a busy machine
if [ "${1:-}" = "--cpu-smoke" ]; then smoke=(--cpu-smoke); export OMP_NUM_THREADS=1; shift; fi
out="${1:-${OUT:-gpu-check}}"
mkdir -p "$out"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_VERBOSITY=error TQDM_DISABLE=1
if [ ${#smoke[@]} -eq 0 ] && compgen -G ".whl/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || { echo "gpu_check: installing .whl/ failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ ${#smoke[@]} -eq 0 ]; then  # the weights need ~30 GB under /tmp
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
    df -h /tmp || true
fi
"$python" benchmarks/gpu_check.py "${smoke[@]}" --out "$out" 2>&1 | tee "$out/gpu_check.log"
