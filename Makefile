# Every target creates .venv on a fresh machine. torch is pinned to the local CPU wheel by
# default; override with `make test TORCH_SPEC='torch==2.14.1'` (an unpinned torch pulls CUDA).
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test ui browser bench speed lint format

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,ray]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m dpl_edit.demo --out demo

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

ui: $(STAMP)
	$(BIN)/dpl ui

# The browser test's headless Chromium and its Selenium driver, from the system's packages (needs
# root and apt; nothing is downloaded at test time). Installed once; later runs only check.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)

bench: $(STAMP)
	$(BIN)/dpl bench --split val --per-category 2 --out bench/results

speed: $(STAMP)
	$(BIN)/python -m dpl_edit.bench.speed --steps 50 --out bench/speed

lint: $(STAMP)
	$(BIN)/ruff check dpl_edit tests
	$(BIN)/ruff format --check dpl_edit tests

format: $(STAMP)
	$(BIN)/ruff format dpl_edit tests
	$(BIN)/ruff check --fix dpl_edit tests
