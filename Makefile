# Setup and entry points. `make demo` and `make test` are the two commands in the README.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel on this machine kind; a user with a GPU overrides it, e.g. make demo TORCH="torch==2.13.0"
# with their CUDA index configured in pip.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test,openvino]"
	touch $@

demo: setup
	PATH="$(abspath $(BIN)):$$PATH" bash scripts/demo.sh

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check mipseg tests benchmarks
	$(BIN)/ruff format --check mipseg tests benchmarks

clean:
	rm -rf mipseg_data .pytest_cache
