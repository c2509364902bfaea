#!/usr/bin/env bash
# The GPU tier on the lent device: the GPU tests on the real card, then the benchmark
# (runtime/bench/gpu.py: kernel GB/s; cpu, gpu and gpu25 prefill/decode on a synth model).
# Run from the repository root. Results go to $OUT (default ./gpu_out).
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root: .whl/, tests/ and the package are read from there

# The device image has numba, numba-cuda, numpy, psutil, tqdm, tokenizers and jinja2, but not
# gguf: its wheel travels in .whl/, which git ignores, so the device call must carry it. Checked
# first, before the machine's time goes into anything else. Prepare it here with
#     bash examples/gpu_wheels.sh
# and run on the device: command "bash examples/gpu_bench.sh", carry [".whl"], timeout_s 600.
WHEELS="${WHEELS:-.whl}"  # (another folder: for this script's own tests)
if ! python3 -c "import gguf" 2>/dev/null && ! ls "$WHEELS"/gguf-*.whl >/dev/null 2>&1; then
    echo "gpu_bench.sh: gguf is not installed and .whl/ holds no gguf wheel: run 'bash examples/gpu_wheels.sh' first, and carry .whl to the device" >&2
    exit 2
fi

# Without a card every GPU test fails and the benchmark writes a 9 GB model for nothing: stop first,
# before anything is written. numpy.row_stack is restored for the check as it is below.
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_bench.sh: no NVIDIA GPU found (nvidia-smi is missing or sees no card); this script needs a lent card" >&2
    exit 2
fi
if ! NUMBA_ENABLE_CUDASIM=0 python3 -c '
import numpy
numpy.row_stack = getattr(numpy, "row_stack", numpy.vstack)
from numba import cuda
raise SystemExit(0 if cuda.is_available() and len(cuda.gpus) > 0 else 1)' >/dev/null 2>&1; then
    echo "gpu_bench.sh: numba cannot use the NVIDIA GPU (numba-cuda missing, or no CUDA driver or device it can open); this script needs a lent card" >&2
    exit 2
fi

OUT="${OUT:-./gpu_out}"
mkdir -p "$OUT"

# gguf from the wheels carried in .whl/ when it is missing (checked above); this package from the tree.
if python3 -c "import gguf" 2>/dev/null; then
    export PYTHONPATH="$PWD"
else
    python3 -m pip install -q --no-index --no-deps --target /tmp/site "$WHEELS"/*.whl
    export PYTHONPATH="/tmp/site:$PWD"
fi
# The device image's numba-cuda still registers numpy.row_stack, which its numpy 2.5 removed: every
# kernel compile failed there until this alias was restored (seen on the lent H200, 2026-12-04).
if ! python3 -c "import numpy; numpy.row_stack" 2>/dev/null; then
    mkdir -p /tmp/site
    printf 'import numpy\nnumpy.row_stack = numpy.vstack\n' > /tmp/site/sitecustomize.py
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
export PYTHONUNBUFFERED=1

echo "== GPU tests on the card (a failure is reported; the benchmark still runs; at most 150 s)"
NUMBA_ENABLE_CUDASIM=0 timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_kernels.py \
    tests/test_gpu_ops.py tests/test_gpu_model.py 2>&1 | tee "$OUT/gpu_tests.log" || true

echo "== benchmark"
NUMBA_ENABLE_CUDASIM=0 python3 -m runtime.bench.gpu --workdir /tmp/ssbench --json "$OUT/gpu_bench.json" "$@" \
    2>&1 | tee "$OUT/gpu_bench.log"
