# clipsam: the two commands a newcomer needs are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipsam-installed

.PHONY: install test test-all demo benchmark-demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Offline tests (no network, no GPU, no slow tests): what CI runs.
test: install
	$(PY) -m pytest -m "not slow and not network and not gpu" -q

## Everything that can run on this machine, slow tests included.
test-all: install
	$(PY) -m pytest -m "not network and not gpu" -q

## The offline demo: synthetic data, tiny random models, fit -> test -> predict.
demo: install
	$(VENV)/bin/python scripts/demo.py

## The offline benchmark grid: every cell of configs/benchmark/demo.yaml, then the compare table
## (rerunning skips finished cells).
benchmark-demo: install
	$(VENV)/bin/clipsam benchmark --config configs/benchmark/demo.yaml

bench: install
	$(PY) scripts/benchmark_metrics.py
	$(PY) scripts/benchmark_clip.py
	$(PY) scripts/benchmark_sam.py
	$(PY) scripts/benchmark_pipeline.py --device cpu --preset tiny

clean:
	rm -rf $(VENV) runs outputs data/synthetic
