# speechbrain-blspkd: the README's commands.  Every target sets itself up.
#
#   make demo     the main job on the embedded default corpus (real models)
#   make test     the whole test suite (CI runs exactly this)
#   make test-fast  the suite without @slow tests (developers)
#   make lint     ruff
#   make bench    the benchmark suite (benchmarks/RESULTS.md)
#
# Variables:
#   TORCH=cpu|cuda   torch build to install (default cpu; cuda takes the
#                    normal CUDA torch from PyPI)
#   VENV=.venv       where the virtual environment lives
#   BLSPKD_ASSETS=…  where converted pretrained models are cached

VENV ?= .venv
TORCH ?= cpu
PY := $(VENV)/bin/python
export TORCH VENV
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install assets demo test test-fast lint bench clean

install:
	@bash tools/install.sh

assets: install
	$(PY) -m speechbrain_blspkd.assets fetch --models whisper-base whisper-tiny.en smollm2-135m-instruct

demo: install
	$(PY) -m speechbrain_blspkd.demo $(DEMO_ARGS)

test: install
	$(PY) -m pytest -q tests --doctest-modules speechbrain_blspkd $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -q -m "not slow" tests --doctest-modules speechbrain_blspkd $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check speechbrain_blspkd recipes tests benchmarks tools
	$(VENV)/bin/ruff format --check speechbrain_blspkd recipes tests benchmarks tools

bench: install
	$(PY) -m benchmarks.run --json results/bench.json

clean:
	rm -rf $(VENV) .pytest_cache
