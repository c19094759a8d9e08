# Every target creates or refreshes the virtual environment first; a second run installs nothing
# (the stamp is newer than pyproject.toml).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.unclip-installed
ARGS ?=
STAGE ?=
FORCE ?=
PYTEST_ARGS ?=

.PHONY: browser venv pipeline stage status plan test test-fast bench gpu-check mlflow-ui clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing unclip and its dependencies into $(VENV) (first run takes a few minutes)"
	@$(BIN)/pip install --disable-pip-version-check -q -e '.[test]' 2>&1 | { grep -v "^WARNING: Location" || true; }
	@touch $@

venv: $(STAMP)  ## create or refresh the virtual environment

pipeline: $(STAMP)  ## run every stage that is not done: make pipeline ARGS="preset=smoke run_dir=/tmp/r"
	$(BIN)/python -m pipelines run $(ARGS)

stage: $(STAMP)  ## run one stage: make stage STAGE=filter [FORCE=1] ARGS="..."
	@test -n "$(STAGE)" || { echo "usage: make stage STAGE=<name> [FORCE=1] [ARGS=...]"; exit 2; }
	$(BIN)/python -m pipelines stage $(STAGE) $(if $(FORCE),--force) $(ARGS)

status: $(STAMP)  ## print every stage as done / stale / missing: make status ARGS="preset=smoke"
	$(BIN)/python -m pipelines status $(ARGS)

plan: $(STAMP)  ## check a preset, print model sizes and GPU memory (no GPU, no download): make plan ARGS="preset=paper"
	$(BIN)/python -m pipelines plan $(ARGS)

gpu-check: $(STAMP)  ## on a GPU machine, <= 8 min: smoke pipeline on CUDA, one bf16 step + MFU per paper-size model, cascade latency (JSON in bench/results)
	$(BIN)/python -m bench.gpu_check $(ARGS)

RUN_DIR ?= runs/tiny
mlflow-ui: $(STAMP)  ## browse the local MLflow store of RUN_DIR (default runs/tiny) on http://127.0.0.1:5000
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(abspath $(RUN_DIR))/mlflow.db

browser:  ## Debian's chromium + chromium-driver for the web page's browser test (apt, as root)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	else echo "make browser: chromium and chromium-driver are missing and installing them needs root" \
	  "(apt-get install chromium chromium-driver); the browser test skips until then"; fi

test: $(STAMP) browser  ## run the test suite
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## the edit-test loop: every test that starts no Ray, smoke run, cluster or MLflow server
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

bench: $(STAMP)  ## run the benchmarks (tables + JSON under bench/results); ARGS="--quick", "--only NAME", "--run-dir RUN" (also measure a finished run)
	$(BIN)/python -m bench $(ARGS)

clean:  ## remove the virtual environment and local runs
	rm -rf $(VENV) runs .pytest_cache
