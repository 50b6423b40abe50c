# Two entry points, each building the virtual environment when it is missing:
#   make demo   -- certified Jacobian bounds and Lipschitz constants on the bundled digits model
#   make test   -- the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# auto-LiRPA 0.3's metadata pins torch<1.13 (not installable on Python 3.11), so it is installed
# without its declared dependencies; its real runtime needs are in pyproject.toml.
LIRPA  ?= auto-LiRPA==0.3
STAMP  := $(VENV)/.rj-installed

.PHONY: venv demo test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps '$(LIRPA)'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rj demo

test: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check rj_plugin tests scripts

bench: $(STAMP)
	$(PY) scripts/bench_scaling.py

clean:
	rm -rf $(VENV) build *.egg-info
