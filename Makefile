# Two commands do everything on a fresh machine:
#   make demo   set up, cut the bundled data into spans, run the pipeline over spans 1-4, serve
#   make test   set up and run the test suite
# Python 3.10 (TFX 1.16 supports 3.9-3.10): a pyenv install if there is one, else python3.10 on PATH.
PYTHON ?= $(firstword $(wildcard $(HOME)/.pyenv/versions/3.10.*/bin/python3.10) $(shell command -v python3.10))
VENV ?= .venv
BIN := $(VENV)/bin
export TF_USE_LEGACY_KERAS := 1
export TF_CPP_MIN_LOG_LEVEL := 3

DEMO_DATA ?= demo-data
DEMO_WORK ?= demo-work
DEMO_SPANS ?= 1-4

.PHONY: setup demo demo-down test clean

# The venv is rebuilt when the pinned dependencies change. Pip is upgraded first:
# the resolver that ships with Python 3.10 backtracks for a long time on TFX.
$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/increc prepare --format movietweetings --input data/movietweetings-100k --out $(DEMO_DATA) --spans 10 --overwrite
	$(BIN)/increc backfill --data $(DEMO_DATA) --work $(DEMO_WORK) --spans $(DEMO_SPANS) --report $(DEMO_WORK)/report.json
	$(BIN)/increc history --work $(DEMO_WORK)
	$(BIN)/increc up --work $(DEMO_WORK)

test: setup
	$(BIN)/python -m pytest -q

demo-down:
	$(BIN)/increc down --work $(DEMO_WORK)

clean:
	rm -rf $(VENV) $(DEMO_DATA) $(DEMO_WORK)
