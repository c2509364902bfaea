#!/usr/bin/env bash
# The wheels examples/gpu_bench.sh needs on a lent GPU machine, fetched here into .whl/ (which
# git ignores: the device call carries it). Its image has numba, numba-cuda, numpy and the rest
# of our dependencies but not gguf, a pure-Python wheel; the same version as here is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(python3 -c "import importlib.metadata as m; print(m.version('gguf'))")
mkdir -p .whl
rm -f .whl/gguf-*.whl  # one version only: two stop the device's install
python3 -m pip download -q --no-deps --only-binary=:all: -d .whl "gguf==$version"
ls .whl/gguf-*.whl
echo "now run on the device: command 'bash examples/gpu_bench.sh', carry [\".whl\"], timeout_s 600"
