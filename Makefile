# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: demo test lint types unit pythons bench docs clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.runtime

demo: $(VENV)/.runtime
	$(PY) examples/batching.py

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: $(VENV)/.dev
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests
	$(VENV)/bin/mypy benchmarks
	$(VENV)/bin/mypy examples

unit: $(VENV)/.dev
	$(VENV)/bin/pytest -q

test: lint types unit

# The unit tests under each Python of PYTHONS that runs here, each in a venv
# of its own named by its version (.venv-3.12.1, ...). Give paths where
# versions are not on PATH: make pythons PYTHONS="/opt/py312/bin/python3.12".
PYTHONS ?= python3.11 python3.12 python3.13 python3.14
pythons:
	@for py in $(PYTHONS); do \
	  if version=$$($$py -c 'import platform; print(platform.python_version())' 2>/dev/null); then \
	    echo "== $$py ($$version)"; \
	    $(MAKE) --no-print-directory unit PYTHON=$$py VENV=.venv-$$version || exit 1; \
	  else echo "== $$py: not here, skipped"; fi; \
	done

bench: $(VENV)/.dev
	$(PY) benchmarks/batching.py --batch --users 10000
	$(PY) benchmarks/batching.py --no-batch --users 10000

docs: $(VENV)/.dev
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) .venv-3.* site .pytest_cache .mypy_cache .ruff_cache
