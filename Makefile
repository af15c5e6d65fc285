# Two commands do all set-up: `make test` and `make demo`. Both create .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
KERNEL := rnnt-workbench
OUT    ?= runs/demo

# The models here are small: one BLAS/OpenMP thread per process is several times faster on a 2-core CPU than
# two threads contending (measured: tiny preset 10 steps, 1.9 s vs ~40 s under load). Override on bigger hosts.
export OMP_NUM_THREADS ?= 1

.PHONY: install browser-deps lint test suite floor-install test-floor demo study bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "RNN-T workbench (.venv)" > /dev/null
	touch $(STAMP)

install: $(STAMP)

# The browser test (tests/test_browser.py) drives JupyterLab in Debian's Chromium through the playwright package
# (installed with the dev extras). Never `playwright install`: its browser download fails on closed networks.
# Without root or apt-get the install is skipped and the test skips itself with its reason.
browser-deps:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get > /dev/null; then \
		apt-get update -qq && apt-get install -y -qq chromium > /dev/null; \
	else echo "browser-deps: no root/apt-get, Chromium not installed; the browser test will be skipped"; fi

# ruff and mypy with the configuration in pyproject.toml (about 35 s cold on the 2-core reference machine under
# load, 2 s with mypy's cache), so make test runs it first.
lint: install
	$(VENV)/bin/ruff check workbench benchmarks
	$(VENV)/bin/mypy

# The suite runs on TEST_JOBS pytest-xdist workers, one per core and pinned to it, each test file on one worker (a
# file's module fixture, a notebook executed once or the fault cases, then runs once), those files first
# (tests/conftest.py). `make test TEST_JOBS=0` runs it in one process.
TEST_JOBS ?= 2
PYTEST    := -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder

# Two at a time (the installs wait mostly on the disk): Chromium, the main venv, lint and the suite, beside the
# floor venv (its last part overlaps the suite's start); then the floor's fast tests. (pip's compiling of every
# module stays: skipped, it came back as more CPU time inside the suite than it saved, measured on a fresh clone.)
test:
	$(MAKE) -j2 -Oline suite floor-install
	$(MAKE) test-floor

suite: install browser-deps lint
	$(PY) $(PYTEST)

# The version floors of pyproject.toml, proven: a second venv with the oldest torch/torchaudio pair the package
# admits runs the fast tests (about 3 minutes with its install on the 2-core reference machine; 6 GB of CUDA
# builds, run on the CPU). `make test FLOOR_VENV=` skips it.
FLOOR_VENV  ?= .venv-floor
FLOOR_TORCH := torch==2.6.0 torchaudio==2.6.0

ifneq ($(FLOOR_VENV),)
# The torch pair first (the bulk, beside the main venv's install), then the package once the main venv's editable
# install has written its metadata into the source tree (two at once would race on it).
$(FLOOR_VENV)/.torch:
	test -x $(FLOOR_VENV)/bin/python || python3 -m venv $(FLOOR_VENV)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(FLOOR_TORCH)
	touch $@

$(FLOOR_VENV)/.installed: pyproject.toml $(FLOOR_VENV)/.torch $(STAMP)
	$(FLOOR_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(FLOOR_TORCH) -e ".[dev]"
	touch $@

floor-install: $(FLOOR_VENV)/.installed

test-floor: $(FLOOR_VENV)/.installed
	$(FLOOR_VENV)/bin/python -c "import torch, torchaudio; print('floor pair:', torch.__version__, torchaudio.__version__)"
	$(FLOOR_VENV)/bin/python $(PYTEST) -p no:cacheprovider -m "not slow and not browser"
else
floor-install test-floor:
endif

# The main job: staged training of the small model with seed-style progress lines and validation PER, then
# notebook 01 executed headlessly (executed copy, figures, run logs and 01_summary.json under $(OUT)), then the
# README's findings block regenerated from what the notebooks computed. Reruns replace $(OUT)'s earlier results.
demo: install
	$(PY) -m workbench train --preset small --data data_samples --out $(OUT)/train \
		--ctc-steps 300 --joint-steps 20 --seed 0 --overwrite
	$(PY) -m workbench notebooks --only 01 --preset small --seed 0 --out $(OUT) --overwrite
	$(PY) -m workbench.views.findings --from $(OUT)

# The second study: notebook 02 (when does the freeze length N matter?) at the small preset with 3 seeds: the
# fixed grid of measures with step-matched CTC-only controls and the fp16 stability-boundary search (bisection over
# lr per policy x N x loop semantics, resumable: rerun after an interruption and finished probes are reused), into
# $(OUT) beside make demo's notebook 01, then the README's findings block (notebook 01's section is kept when only
# 02 ran) and docs/findings.md.
study: install
	$(PY) -m workbench notebooks --only 02 --preset small --seed 0 --out $(OUT) --overwrite
	$(PY) -m workbench.views.findings --from $(OUT)

bench: install
	$(PY) benchmarks/bench_instrumentation.py

# Removes only what the project itself generates and regenerates on demand: make demo's output, the CTC-warm
# checkpoint and real-length data caches, the browser test's screenshots, the test cache and the build folder.
# Everything else under runs/ (your runs on real data, the notebooks' output folders) is kept.
GENERATED := runs/demo runs/cache runs/data runs/browser .pytest_cache build

clean:
	rm -rf $(GENERATED)
	@if [ -d runs ]; then echo "clean: kept runs/: $$(ls -A runs | tr '\n' ' ')"; fi
