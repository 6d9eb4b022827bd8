#!/usr/bin/env bash
# Issue 8's overhead table on one CUDA GPU: float32, then bfloat16 autocast.
# Usage: bash benchmarks/gpu_overhead.sh [results-folder]   (PYTHON=... to pick the interpreter)
# Sized to finish in under 5 minutes on one data-centre GPU; each run stops after 140 s
# and writes the settings it finished (its JSON says "complete": false), then the next runs.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
out=${1:-benchmarks/results}
mkdir -p "$out"
"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timed() {  # a run stopped by the timeout (124) is partial, not failed; other errors stop
    timeout 140 "$python" benchmarks/overhead.py --device cuda --repeats 10 "$@" || {
        rc=$?; [ "$rc" -eq 124 ] || exit "$rc"; echo "stopped at 140 s: partial JSON"; }
}
timed --output "$out/overhead-cuda-fp32.json"
timed --amp bf16 --output "$out/overhead-cuda-bf16.json"
