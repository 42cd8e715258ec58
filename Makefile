# make demo   the main job: accuracy against trained parameters for LFMA, LoRA, FourierFT, head-only
#             and full fine-tuning of a small ViT on scikit-learn's digits (table, results/demo.json,
#             results/demo.png); `.venv/bin/lfma-demo --full` for every LFMA variant and budget
# make test   unit tests (tests/, the demo's --quick smoke run included), in a local virtual
#             environment created on first use
# make bench  the CPU benchmarks (layer and model level), written to benchmarks/RESULTS.md
# make gpu-check OUT=folder   on a CUDA machine, one budgeted run (about 7.5 minutes) that builds the
#             extension, runs the CUDA tests and the GPU benchmarks and writes RESULTS_GPU.md and
#             gpu_constants.json into OUT (benchmarks/gpu_check.py); needs no .venv, installs nothing

PYTHON ?= python3
VENV = .venv
VENV_PYTHON = $(VENV)/bin/python
PIP = $(VENV)/bin/pip
# Pinned and installed before the package: left to the resolver, `torch>=2.4` could pull a
# newer torch and, on Linux, gigabytes of CUDA wheels.
TORCH_VERSION ?= 2.13.0
STAMP = $(VENV)/.installed

.PHONY: test demo bench gpu-check venv clean

test: $(STAMP)
	$(VENV_PYTHON) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/lfma-demo

bench: $(STAMP)
	$(VENV_PYTHON) benchmarks/bench_layer.py --ratios 0.0001,0.0003,0.0005,0.0016,0.05 --output benchmarks/RESULTS.md
	$(VENV_PYTHON) benchmarks/bench_models.py --output benchmarks/RESULTS.md --charts benchmarks/models_cpu.png

# No $(STAMP) prerequisite: a GPU machine may have no package registry, so this runs with the
# interpreter that is there (the project's .venv where one exists) over the source tree.
OUT ?= results/gpu-check
gpu-check:
	$(if $(wildcard $(VENV_PYTHON)),$(VENV_PYTHON),$(PYTHON)) benchmarks/gpu_check.py $(OUT)

venv: $(STAMP)

# Reruns whenever the packaging or the C++/CUDA sources change, or when .venv exists without
# the stamp (reinstalling into an existing environment is harmless). The package is installed
# without build isolation so that setup.py compiles the extension (csrc/) against the
# environment's torch; ninja runs the compile jobs in parallel. DISABLE_CUDA=1 is hqq's switch (the
# quant extra): its sdist would otherwise try to compile CUDA kernels with whatever nvcc it finds.
$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(VENV_PYTHON) || $(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==$(TORCH_VERSION)" "setuptools>=64" wheel ninja
	DISABLE_CUDA=1 $(PIP) install --no-build-isolation -e ".[dev,demo,bench,peft,quant]"
	touch $(STAMP)

clean:
	rm -rf build dist *.egg-info .pytest_cache .benchmarks lfma_kernels/_C*.so
