#!/usr/bin/env bash
# The integration tests' own environment: vlcore beside the real open_clip, timm and transformers.
#
# Those libraries need torchvision, which does not import beside the CPU-only torch of the main
# environment, so they get a second virtual environment with a torch / torchvision pair that does
# (the CUDA builds, which run on CPU; the wheels lie on the CI machine's disk, the libraries come from
# PyPI). vlcore is built into it CPU-only, in its own build directory (the main environment's build
# directory is keyed by the wheel tag alone and holds objects compiled against the other torch).
#
# Then it runs python_tests/integrations and python_tests/models/test_pretrained.py with
# VLCORE_REQUIRE_INTEGRATIONS=1, which turns a test skipped for a missing library into a failure:
# this environment exists to run them, so a skip here means it is broken.
#
#   bash .ci/integration_env.sh          # create or reuse the environment, then test
#   INTEGRATION_VENV=DIR PYTHON=python3.11 bash .ci/integration_env.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${INTEGRATION_VENV:-build/venv-integrations}"
WHEELS="${INTEGRATION_WHEELS:-/opt/pypi-more/files}"  # where torch 2.14.1 / torchvision 0.29.1 lie
TORCH_PAIR=("torch==2.14.1" "torchvision==0.29.1")
# Versions tested together with that torch; open_clip and timm import torchvision at import time.
LIBRARIES=("open_clip_torch==3.3.0" "timm==1.0.29" "transformers==5.18.0" "safetensors>=0.4")
BUILD_TOOLS=("scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja "pytest>=8" hypothesis numpy)

start=$(date +%s)
test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
if ! "$PY" -c "import torch, torchvision" 2>/dev/null; then
    # The torch pair from the local wheels where they lie (their CUDA dependencies come from the
    # configured indexes, local ones included); from the package index otherwise.
    local_pair=()
    for spec in "${TORCH_PAIR[@]}"; do
        name="${spec%%==*}"; version="${spec##*==}"
        wheel=$(ls "$WHEELS/$name-$version"-cp*-manylinux*_x86_64.whl 2>/dev/null | head -n 1 || true)
        local_pair+=("${wheel:-$spec}")
    done
    "$PY" -m pip install -q "${local_pair[@]}"
fi
"$PY" -m pip install -q "${LIBRARIES[@]}" "${BUILD_TOOLS[@]}"
VLCORE_ENABLE_CUDA=OFF "$PY" -m pip install -q --no-build-isolation -C build-dir=build/integrations -e .
installed=$(date +%s)

VLCORE_REQUIRE_INTEGRATIONS=1 "$PY" -m pytest -q \
    python_tests/integrations python_tests/models/test_pretrained.py
finished=$(date +%s)
echo "integration environment: install $((installed - start)) s, tests $((finished - installed)) s"
