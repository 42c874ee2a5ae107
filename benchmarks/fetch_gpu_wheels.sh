#!/usr/bin/env bash
# Download (here, where pip works) the wheels benchmarks/gpu.sh installs on a GPU machine
# without network: unetjax's dependencies that a CUDA image with JAX and PyTorch may lack.
# Python 3.12, manylinux x86-64 (the lent H100/H200 image); pass another version as $1.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl ml-collections PyYAML
ls -la .whl
