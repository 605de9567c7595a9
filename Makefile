# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

# Settings (CHECKPOINT, ENGINE, ENGINE_DIR, PRECISION, MAX_NUM_TOKENS, PORT, ...) are read by the server
# from the environment, over config.yaml's model_metadata: `make serve CHECKPOINT=...` passes them on.
# Defaults live in config.yaml only, so the two never disagree.
OUT ?= data/engine
MAX_NUM_TOKENS ?= 16384
export CHECKPOINT REVISION ENGINE ENGINE_DIR PRECISION PORT WINDOW_STRIDE MAX_TEXTS API_KEY
export PYTHONPATH := $(CURDIR)/packages:$(CURDIR)

.PHONY: install lint format serve test stress bench build-engine clean

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch would pull a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(PY) -m nerserve.server

# ruff (lint and format check) and mypy, with their settings in pyproject.toml; `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Apply the formatter and ruff's safe fixes.
format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest -q tests

stress: $(STAMP)
	$(PY) -m pytest -q -m stress tests

bench: $(STAMP)
	$(PY) bench/run.py

build-engine: $(STAMP)
	$(PY) build/build_engine.py --checkpoint "$(or $(CHECKPOINT),dslim/bert-base-NER-uncased)" $(if $(REVISION),--revision "$(REVISION)") \
		--max-num-tokens $(MAX_NUM_TOKENS) $(if $(PRECISION),--precision $(PRECISION)) --out "$(OUT)"

clean:
	rm -rf $(VENV) .pytest_cache
