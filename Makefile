# Everything a fresh machine needs: `make test` and `make demo` create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so pip never resolves a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,parquet]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check shiftbn tests benchmarks
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/shiftbn demo

lint: $(STAMP)
	$(BIN)/ruff check shiftbn tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_samplers.py
	$(BIN)/python benchmarks/bench_stats.py
	$(BIN)/python benchmarks/bench_matrix.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
