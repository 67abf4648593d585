# Two entry points: `make demo` and `make test`. Both create .venv from requirements.txt when it is
# missing (or older than requirements.txt), using only Python 3.11 and pip.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test setup toy browser clean

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

# The search page's test drives a real headless Chromium: Debian's chromium and chromium-driver,
# installed here when missing if we run as root with apt; elsewhere that test is skipped. A failed
# install is recorded in .venv and not retried (delete $(VENV)/.no-browser to try again).
browser: setup
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ -e $(VENV)/.no-browser ]; then echo "chromium is not installed: the browser test will be skipped"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium chromium-driver >/dev/null) \
	    || { touch $(VENV)/.no-browser; echo "could not install chromium: the browser test will be skipped"; }; \
	else echo "chromium is not installed (needs root and apt): the browser test will be skipped"; fi

test: setup browser
	$(PY) -m pytest -q tests

clean:
	rm -rf runs/toy cache
