# The two commands of the README's quick start, plus the CUDA compile check that CI runs.
# Each creates (or reuses) a virtual environment in $(VENV), installs torch and vlcore into it, then runs.
#
#   make train        the main job: vlcore-train's default preset (tiny CLIP on the embedded shapes dataset,
#                     CPU-friendly), printing the held-out retrieval R@1/5/10; output in runs/default
#   make test         the test suite (CPU; on a CUDA build with a GPU, the CUDA kernels too)
#   make check-cuda   compile every .cu for sm_90a and sm_80 with nvcc, without a GPU or a CUDA torch
#   make check-device-dry   benchmarks/device_check.sh --dry-run: the GPU check's logic on the CPU

PYTHON ?= python3
VENV ?= .venv
# Any torch in the supported range. CI sets TORCH_SPEC=torch==2.13.0 (the CPU wheel on its local disk).
TORCH_SPEC ?= torch>=2.4
# Every .cu is compiled for each of these (one nvcc call per file, one -gencode per target).
CUDA_ARCH ?= 90a 80

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.vlcore-installed
SOURCES := pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null)

.PHONY: train test check-cuda check-device-dry clean

train: $(STAMP)
	$(PY) -m vlcore.train --preset default

test: $(STAMP)
	$(PY) -m pytest python_tests -q

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH_SPEC)"
	$(PIP) install "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.26" ninja "pytest>=8" "hypothesis>=6" numpy
	$(PIP) install --no-build-isolation -e .
	touch $@

check-cuda: $(STAMP)
	PYTHON=$(PY) CUDA_ARCH="$(CUDA_ARCH)" bash .ci/check_cuda_compile.sh

check-device-dry: $(STAMP)
	OUT=benchmarks/results/device_check_dry PYTHON=$(PY) bash benchmarks/device_check.sh --dry-run

clean:
	rm -rf build $(VENV)
