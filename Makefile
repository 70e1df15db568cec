# NHB Lab: two commands on a fresh machine.
#   make demo   create/refresh .venv, install, prepare the synthetic demo study if absent, start the dashboard
#   make test   create/refresh .venv, install, lint (ruff + mypy), run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.nhb-installed
RUNS_DIR ?= runs
DEMO_RUN := $(RUNS_DIR)/demo
PORT ?= 8501

.PHONY: venv demo test lint dashboard browser bench clean-venv

# pyproject.toml is the one list of dependencies (runtime + the dev extra: tests, lint, notebooks);
# constraints.txt pins the torch build.
$(STAMP): constraints.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -c constraints.txt --no-build-isolation -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

# Debian's chromium for the real-browser tests (Playwright drives it through its
# executable path; Playwright cannot download browsers here). Skipped where apt is absent.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian chromium for the browser tests"; \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		  || echo "warning: could not install chromium; browser tests will skip"; \
	else echo "note: no apt/root: browser tests will skip"; fi

demo: venv
	@mkdir -p $(RUNS_DIR)
	@if [ -f $(DEMO_RUN)/status.json ] && grep -q '"done"' $(DEMO_RUN)/status.json; then \
		echo "demo study found in $(DEMO_RUN)"; \
	else \
		$(PY) -m nhb_core demo --out $(DEMO_RUN); \
	fi
	NHB_RUNS_DIR=$(RUNS_DIR) $(PY) -m streamlit run app.py --server.port $(PORT)

dashboard: venv
	NHB_RUNS_DIR=$(RUNS_DIR) $(PY) -m streamlit run app.py --server.port $(PORT)

# ruff (rules in pyproject.toml [tool.ruff]) and mypy (pyproject.toml [tool.mypy]) on the packages
lint: venv
	$(PY) -m ruff check .
	$(PY) -m mypy

test: venv browser lint
	$(PY) -m pytest -q -p no:cacheprovider

bench: venv
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean-venv:
	rm -rf $(VENV)
