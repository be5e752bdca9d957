# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
PROTOS := $(wildcard protos/stitchgraph/v1/*.proto)
STUBS  := stitchgraph/v1/__init__.py

.PHONY: run test bench demo setup stubs migrate lint typecheck demo-clean clean

## run: set up, apply migrations and serve on 127.0.0.1:50051 (SQLite under ./var/)
run: setup
	@mkdir -p var
	$(VENV)/bin/stitchgraph serve

## test: set up, make sure PostgreSQL binaries exist, run the whole suite
test: setup
	@STITCHGRAPH_PG_BINDIR="$$(scripts/ensure-postgres.sh)" $(PY) -m pytest $(PYTEST_ARGS)

## bench: run every benchmark and print its figures
bench: setup
	$(PY) -m bench $(BENCH_ARGS)

## demo: the same set-up, then the server with Meta and PostHog sandboxes on loopback and a printed trace
demo: setup
	$(PY) scripts/demo.py

setup: $(INSTALLED) $(STUBS)

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

$(STUBS): $(PROTOS) $(INSTALLED) scripts/gen_stubs.py
	$(PY) scripts/gen_stubs.py

stubs: $(INSTALLED)
	$(PY) scripts/gen_stubs.py

migrate: setup
	$(VENV)/bin/stitchgraph migrate

lint: setup
	$(VENV)/bin/ruff check .

typecheck: setup
	$(VENV)/bin/mypy stitchgraph/errors.py stitchgraph/db.py stitchgraph/idempotency.py stitchgraph/changes.py stitchgraph/scheduler.py stitchgraph/migrations/__init__.py identity audiences server

clean:
	rm -rf $(VENV) stitchgraph/v1 .pytest_cache .mypy_cache .ruff_cache
