# Two commands set everything up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

# Settings keep their short names here (`make serve CHECKPOINT=... ENGINE=torch`, from the command line
# or the environment) and reach the server as NERSERVE_<NAME>, over config.yaml's model_metadata, where
# their defaults live. PORT is taken from the command line only: platforms set PORT in the environment
# for their own proxy (Baseten does), and a server that took it would bind the proxy's port.
SETTINGS := CHECKPOINT REVISION ENGINE ENGINE_DIR PRECISION MAX_NUM_TOKENS WINDOW_STRIDE WORKERS MAX_TEXTS \
	MAX_BODY_BYTES QUEUE_SIZE BATCH_WAIT_MS REQUEST_TIMEOUT_S API_KEY HOST LOG_LEVEL
$(foreach name,$(SETTINGS),$(if $($(name)),$(eval export NERSERVE_$(name) := $($(name)))))
ifeq ($(origin PORT),command line)
export NERSERVE_PORT := $(PORT)
endif
OUT ?= data/engine
export PYTHONPATH := $(CURDIR)/packages:$(CURDIR)

.PHONY: install lint format serve test stress soak bench screenshot build-engine clean

$(STAMP): requirements.txt requirements-ray.txt requirements-presidio.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: 2.13.0 is the local CPU wheel; an unpinned torch would pull a CUDA build.
	# pip would compile every installed file on one core (a fresh install here took 95 s with it, 37 s
	# without);
	# compileall does it on every core, so no process of the tests compiles what it imports. A file that
	# does not compile (a template, another Python's source shipped in a package) is skipped, as pip skips it.
	$(PY) -m pip install -q --no-compile torch==2.13.0
	$(PY) -m pip install -q --no-compile -r requirements-dev.txt
	$(PY) -m compileall -q -j 0 $$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") > /dev/null || true
	# the package itself, editable: the `nerserve` command ($(VENV)/bin/nerserve) over packages/ as it is
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# ruff (lint and format check) and mypy, with their settings in pyproject.toml; `make test` runs it first.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# Apply the formatter and ruff's safe fixes.
format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

serve: $(STAMP)
	$(PY) -m nerserve serve

# Two pytest-xdist workers, each taking whole test files (module fixtures, such as a file's server, stay
# one per file); the slowest tests are listed at the end.
test: lint
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

stress: $(STAMP)
	$(PY) -m pytest -q -m stress tests

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(PY) -m pip install -q -r requirements-bench.txt
	touch $(BENCH_STAMP)

# The pipeline, the engine and the server over HTTP (bench/run.py), then the server's processes: host
# capacity at each worker count, the real engine beside the single-process server, mixed load (bench/host.py);
# `nerserve tag` over HTTP, in process and on Ray, its own CPU, and a resume after SIGKILL (bench/tag.py);
# `nerserve eval` beside `nerserve tag` and its F1 beside the build's (bench/eval.py); the Hugging Face route
# beside /predict_tokens and Presidio with NerServeRecognizer beside its own engine (bench/hf_api.py); the HTTP
# rate of the tree before issue 24's limits and of this one, in turns in one run (bench/http_rate.py).
bench: $(BENCH_STAMP)
	$(PY) bench/run.py
	$(PY) bench/host.py
	$(PY) bench/tag.py
	$(PY) bench/eval.py
	$(PY) bench/hf_api.py
	$(PY) bench/http_rate.py

# Ten minutes of mixed, partly hostile load with a worker killed every minute (bench/soak.py; issue 24):
# wrong answers, lost requests, memory at start and end, sentence latency, /health's worst.
soak: $(BENCH_STAMP)
	$(PY) bench/soak.py

# The README's picture of the page (docs/ui.png), taken by the browser test on the shared checkpoint.
screenshot: $(STAMP)
	UPDATE_SCREENSHOT=1 $(PY) -m pytest -q tests/test_ui.py -k screenshot

# build/build_engine.py (build/README.md): the checkpoint, precision and budget default to the server's
# (config.yaml, engine defaults).
build-engine: $(STAMP)
	$(PY) build/build_engine.py --out "$(OUT)"

clean:
	rm -rf $(VENV) .pytest_cache
