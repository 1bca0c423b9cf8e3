# Two commands on a fresh machine (Python 3.11, no GPU): `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint bench clean browser

# (Re)install when a requirements file changes.
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m magicpose_jax.pose.models install
	@touch $(STAMP)

demo: $(STAMP)
	$(PY) -m magicpose_jax.demo --out outputs/demo

# The web app's browser test (tests/test_app.py) drives Debian's Chromium; installed only where missing (as root).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium chromium-driver; \
	  else echo "the browser test needs: sudo apt-get install -y chromium chromium-driver"; fi; fi

test: $(STAMP) browser
	@$(PY) -m magicpose_jax.pose.models install  # no-op (0.5 s) when present; refills a cleared cache
	$(PY) -m pytest -q -n 2 --dist loadfile

test-slow: $(STAMP)
	MAGICPOSE_XLA_DEFAULTS=1 $(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check magicpose_jax tests benchmarks configs

bench: $(STAMP)
	$(PY) benchmarks/unet_forward.py

clean:
	rm -rf $(VENV) outputs
