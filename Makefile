# Everything a fresh machine needs: `make test` and `make demo` create .venv themselves.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help system-deps test test-slow test-integrations demo docs lint bench bench-camelyon clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | expand -t 20

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, pinned, so pip never resolves a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,parquet,docs]"
	touch $(STAMP)

# Chromium, Debian's Fashion-MNIST and fonts: installed with apt as root, else the command to run is printed.
system-deps:  ## install what the tests need from the system (chromium, Fashion-MNIST, fonts)
	@[ -n "$$SKIP_SYSTEM_DEPS" ] || tools/system-deps.sh

test: $(STAMP) system-deps  ## lint, the core test suite and the docs build (< 5 min on 2 idle cores)
	$(BIN)/ruff check shiftbn tests benchmarks
	$(BIN)/python -m pytest
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

# The documentation site (MkDocs + Material + mkdocstrings) into site/; broken links fail the build.
docs: $(STAMP)  ## build the documentation site into site/
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The libraries users train with, tested for real in their own environment (~5.5 GB: torch's CUDA build,
# run on the CPU). torch and torchvision first, pinned, and kept by a constraints file so no later
# install pulls another torch; the libraries pinned to the versions the suite was written against. The pins
# live here, so a changed Makefile reinstalls (pip keeps what already matches).
VENV_INT := .venv-integrations
BIN_INT := $(VENV_INT)/bin
STAMP_INT := $(VENV_INT)/.installed
PINS_INT := torch==2.14.1 torchvision==0.29.1
LIBS_INT := timm==1.0.31 monai==1.6.1 lightning==2.6.6 datasets==5.2.0 nibabel==5.4.2

$(STAMP_INT): pyproject.toml Makefile
	test -x $(BIN_INT)/python || $(PY) -m venv $(VENV_INT)
	$(BIN_INT)/python -m pip install -q --upgrade pip
	$(BIN_INT)/python -m pip install -q $(PINS_INT)
	printf '%s\n' $(PINS_INT) > $(VENV_INT)/constraints.txt
	$(BIN_INT)/python -m pip install -q -c $(VENV_INT)/constraints.txt $(LIBS_INT)
	$(BIN_INT)/python -m pip install -q -c $(VENV_INT)/constraints.txt -e ".[dev]"
	touch $(STAMP_INT)

test-integrations: $(STAMP_INT)  ## timm, torchvision, MONAI, Lightning, datasets in .venv-integrations
	$(BIN_INT)/python -m pytest tests/integrations

# Slow tests (marked @pytest.mark.slow): full-size studies and long end-to-end runs.
test-slow: $(STAMP)  ## the long end-to-end runs (marked slow)
	$(BIN)/python -m pytest -m slow

demo: $(STAMP)  ## the demo: train, matrix, report (shiftbn demo --quick for seconds)
	$(BIN)/shiftbn demo

lint: $(STAMP)  ## ruff
	$(BIN)/ruff check shiftbn tests benchmarks

# Timings: 1 torch thread, functions interleaved round by round, fastest and median round printed.
bench: $(STAMP)  ## the performance ratios (benchmarks/)
	$(BIN)/python benchmarks/bench_samplers.py
	$(BIN)/python benchmarks/bench_stats.py --model resnet18
	$(BIN)/python benchmarks/bench_stats.py --model smallresnet
	$(BIN)/python benchmarks/bench_sequential.py
	$(BIN)/python benchmarks/bench_matrix.py
	$(BIN)/python benchmarks/bench_dense.py
	$(BIN)/python benchmarks/bench_getitems.py
	$(BIN)/python benchmarks/bench_memory.py

# Needs the generated data (benchmarks/make_camelyon_like.py, ~100k PNGs under /tmp); N=all rows by default.
CAMELYON_N ?=
bench-camelyon: $(STAMP)  ## the Camelyon-shaped benchmark (needs its generated data)
	$(BIN)/python benchmarks/bench_camelyon.py $(if $(CAMELYON_N),--n $(CAMELYON_N))

clean:  ## remove the environments and build outputs
	rm -rf $(VENV) $(VENV_INT) .pytest_cache build site *.egg-info
