# Two entry points for a fresh machine: `make demo` and `make test`. Each creates .venv first.
PYTHON ?= python3
VENV ?= .venv
# Where there is no GPU, pin torch's CPU wheel (an unpinned torch pulls a multi-GB CUDA build).
TORCH ?= $(if $(shell command -v nvidia-smi 2>/dev/null),torch,torch==2.13.0)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	touch $@

.PHONY: install demo test
install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/weightsync demo

test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q
