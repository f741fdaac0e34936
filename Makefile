# The two commands a newcomer needs: `make app` and `make test`.
# Both create .venv and install into it first when it is missing or out of date.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# On the development machines torch 2.13.0 is a local CPU build; an unpinned torch
# would pull a multi-GB CUDA build. Override for your own machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.installed
RUN    ?= sample_runs/stdlib-gpt
PORT   ?= 8501

.PHONY: setup app test test-fast browser-deps bench sample-run clean

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml setup.py analysis/merge/_fused.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

app: $(STAMP)
	$(PY) -m analysis ui $(RUN) --port $(PORT)

# Debian's chromium drives the one browser test; installed when we may (root + apt), else the test skips.
browser-deps:
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian chromium for the browser test"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser test will skip"; \
	fi

test: $(STAMP) browser-deps
	$(PY) -m pytest -n 2 --dist loadgroup

test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -m "not browser and not slow"

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

sample-run: $(STAMP)
	$(PY) sample_runs/make_sample_run.py --out $(RUN) --overwrite --save-optimizer last

clean:
	rm -rf $(VENV) .pytest_cache test-artifacts
