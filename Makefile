# The two commands: `make demo` (set up + the main job) and `make test` (set up + the tests).
VENV  ?= .venv
PY    := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PIP   := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: demo test test-fast test-cupynumeric lint docs clean

$(VENV)/.base:
	python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $@

$(VENV)/.bench: $(VENV)/.base pyproject.toml
	$(PIP) -e ".[bench]"
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) -e ".[test,bench,dev]"
	touch $@

# HeavyBall 0.7.2 (the reference for the Foreach* optimizers) cannot be installed beside 3.x
# under the same name: its wheel is unpacked here and loaded by tests/_heavyball072.py.
HB072 := .cache/heavyball-0.7.2/heavyball/__init__.py
$(HB072): $(VENV)/.base
	$(PY) -m pip download -q --disable-pip-version-check --no-deps -d .cache/wheels heavyball==0.7.2
	$(PY) -m zipfile -e .cache/wheels/heavyball-0.7.2-py3-none-any.whl .cache/heavyball-0.7.2

$(VENV)/.docs: $(VENV)/.base pyproject.toml
	$(PIP) -e ".[docs]"
	touch $@

demo: $(VENV)/.bench
	$(PY) -m funcopt.bench --out bench-report

test: $(VENV)/.test $(HB072) lint
	$(PY) -m pytest -q -n 2 -m "not cupynumeric" tests
	$(MAKE) test-cupynumeric

test-fast: $(VENV)/.test $(HB072)
	$(PY) -m pytest -q -x -m "not cupynumeric" tests

# The cuPyNumeric (Legate) backend runs in a process of its own; see .ci/cupynumeric.sh.
test-cupynumeric: $(VENV)/.test
	PY=$(PY) bash .ci/cupynumeric.sh

lint: $(VENV)/.test
	$(PY) -m ruff check funcopt tests examples benchmarks
	$(PY) -m mypy --no-incremental

# The guides and the API reference (from the docstrings) into docs/_build/html; warnings fail.
docs: $(VENV)/.docs
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

clean:
	rm -rf $(VENV) bench-report .pytest_cache .hypothesis docs/_build
