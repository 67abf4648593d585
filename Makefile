# Two entry points: `make demo` and `make test`. Both create .venv from requirements.txt when it is
# missing (or older than requirements.txt), using only Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup toy clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

setup: $(VENV)/.installed

toy: setup
	$(PY) -m utils.tiny_encoders --root cache

demo: setup  # scripts/demo.sh builds (or reuses) the toy data and encoders
	bash scripts/demo.sh

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf runs/toy cache
