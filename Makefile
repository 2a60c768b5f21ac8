# controlmd: `make demo` runs a small experiment, `make test` runs the default test suite.
# Both create/reuse a virtual environment in $(VENV) and install what they need.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= test,rl,dist
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.controlmd-installed
export OMP_NUM_THREADS ?= 2

.PHONY: install demo test test-slow lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch goes in first and alone so that no dependency resolution can pull a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/controlmd run experiments/demo.toml

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache
