# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create the virtual environment .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# These machines pin the local CPU build of torch; elsewhere set TORCH_SPEC to your own (e.g. TORCH_SPEC=torch).
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all test-zoo zoo-report bench data clean

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

# The torchvision model zoo (tests/test_zoo.py): its own environment, since torchvision needs a torch of its own.
ZOO_VENV := .venv-zoo
ZOO_TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

$(ZOO_VENV)/bin/pytest: pyproject.toml
	test -x $(ZOO_VENV)/bin/python || $(PYTHON) -m venv $(ZOO_VENV)
	$(ZOO_VENV)/bin/python -m pip install -q --upgrade pip
	$(ZOO_VENV)/bin/python -m pip install -q $(ZOO_TORCH_SPEC)
	$(ZOO_VENV)/bin/python -m pip install -q -e ".[test]"
	touch $(ZOO_VENV)/bin/pytest

test-zoo: $(ZOO_VENV)/bin/pytest
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(ZOO_VENV)/bin/python -m pytest -m zoo tests/test_zoo.py $(ZOO_ARGS)

# The zoo architecture by architecture, resumable, with time and memory per architecture: docs/zoo.md.
zoo-report: $(ZOO_VENV)/bin/pytest
	$(ZOO_VENV)/bin/python scripts/zoo.py --jobs $${ZOO_JOBS:-2} --out runs/zoo --table docs/zoo.md $(ZOO_ARGS)

bench: $(BIN)/mipp
	for f in benchmarks/bench_*.py; do $(BIN)/python $$f || exit 1; done

clean:
	rm -rf $(VENV) $(ZOO_VENV) runs build dist src/*.egg-info
