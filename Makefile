# Two commands for a new machine: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= vlmflow-work
SPEC ?= specs/recipes/shapes-tiny.yaml
PYTEST_ARGS ?=
# Two pytest workers, each test file on one of them (module fixtures stay whole), the longest
# files first (tests/conftest.py): most of an end-to-end test's time is start-up and waiting,
# so two side by side use the two cores.
PYTEST_PARALLEL ?= -n 2 --dist loadfile --no-loadscope-reorder
# The suite's slowest tests, listed at its end: where CI's time goes.
PYTEST_REPORT ?= --durations=30 --durations-min=20
# The twins' learning proofs (5-10 min each) run in `make test-learning`, not in every `make test`.
PYTEST_MARKS ?= -m "not learning"
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast test-learning lint format clean

install: $(STAMP)

# torch comes first and alone: `pip install torch==2.13.0` takes the local CPU wheel,
# so the project install below finds it satisfied and never pulls a CUDA build. setuptools'
# boxed notice about editable installs with a package map is not for users (PYTHONWARNINGS).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet pip==26.3
	$(PY) -m pip install --quiet torch==2.13.0
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: install
	$(VENV)/bin/vlmflow run $(SPEC) --workdir $(WORKDIR)

# pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest $(PYTEST_PARALLEL) $(PYTEST_MARKS) $(PYTEST_REPORT) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5): failing"; exit 1; fi; \
	exit $$rc

# Every tiny twin trained end to end and checked against its baselines (tests marked `learning`).
test-learning: install
	$(PY) -m pytest -m learning $(PYTEST_REPORT) $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-learning: pytest collected no tests (exit 5): failing"; exit 1; fi; \
	exit $$rc

# A quick check while editing: the unit tests only (tests/unit), quiet, stopping at the first failure.
test-fast: install
	$(PY) -m pytest tests/unit -x -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-fast: pytest collected no tests (exit 5): failing"; exit 1; fi; \
	exit $$rc

lint:
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format:
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(WORKDIR) build *.egg-info
