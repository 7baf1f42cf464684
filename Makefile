# Two commands from a fresh clone (Python >= 3.10 needed, nothing else):
#   make demo   set up .venv and run the main demo (the generalization recipe) on MNIST-1D
#   make test   set up .venv and run lint, format check, type check and the whole test suite
#
# The virtual environment reuses an existing torch: when the Python that creates it can already
# import torch, .venv sees the system packages; otherwise torch==2.13.0 is installed (TORCH_CPU;
# add --index-url https://download.pytorch.org/whl/cpu to it where pip would pick a CUDA build).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_CPU ?= torch==2.13.0
DEMO ?= recipes/generalization.py

.PHONY: venv install demo test lint typecheck pytest bench clean

$(PY):
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "torch found in $(PYTHON): .venv will reuse it"; \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install -q --upgrade pip

venv: $(PY)

install: $(PY)
	@if $(PY) -c "import torch" >/dev/null 2>&1; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') already installed: kept"; \
	else \
		$(PY) -m pip install -q $(TORCH_CPU); \
	fi
	$(PY) -m pip install -q -e ".[dev]"

demo: install
	$(PY) $(DEMO) $(DEMO_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: install
	$(PY) -m mypy

pytest: install
	$(PY) -m pytest

test: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/metrics.py
	$(PY) benchmarks/heads.py
	$(PY) benchmarks/losses.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .mypy_cache .ruff_cache .pytest_cache
