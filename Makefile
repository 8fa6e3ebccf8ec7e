# Everything a fresh machine needs: `make test` and `make demo` create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo lint bench bench-camelyon clean

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

# Slow tests (marked @pytest.mark.slow): full-size studies and long end-to-end runs.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

demo: $(STAMP)
	$(BIN)/shiftbn demo

lint: $(STAMP)
	$(BIN)/ruff check shiftbn tests benchmarks

# Timings: 1 torch thread, functions interleaved round by round, fastest and median round printed.
bench: $(STAMP)
	$(BIN)/python benchmarks/bench_samplers.py
	$(BIN)/python benchmarks/bench_stats.py --model resnet18
	$(BIN)/python benchmarks/bench_stats.py --model smallresnet
	$(BIN)/python benchmarks/bench_sequential.py
	$(BIN)/python benchmarks/bench_matrix.py
	$(BIN)/python benchmarks/bench_getitems.py
	$(BIN)/python benchmarks/bench_memory.py

# Needs the generated data (benchmarks/make_camelyon_like.py, ~100k PNGs under /tmp); N=all rows by default.
CAMELYON_N ?=
bench-camelyon: $(STAMP)
	$(BIN)/python benchmarks/bench_camelyon.py $(if $(CAMELYON_N),--n $(CAMELYON_N))

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
