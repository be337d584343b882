# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# These machines pin the local CPU build of torch; elsewhere set TORCH_SPEC to your own (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all bench data clean

$(BIN)/mipp: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(BIN)/mipp

data:
	@bash scripts/get-data.sh

demo: $(BIN)/mipp data
	$(BIN)/mipp demo --out runs/demo

test: $(BIN)/mipp
	$(BIN)/python -m pytest

test-all: $(BIN)/mipp
	$(BIN)/python -m pytest -m ""

bench: $(BIN)/mipp
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) runs build dist src/*.egg-info
