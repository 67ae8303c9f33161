# One entry point for people, CI (.ci/run) and hooks.
#
# The test services default to the local ones of our development machines;
# override any of them on the command line or in the environment, e.g.
#   make test DND_TEST_REDIS_URL=redis://otherhost:6379/0
# Running pytest directly takes them from the environment only (and fails with
# a message naming the variable when one is missing and no Docker engine runs).

PYTHON ?= python3
DND_TEST_DATABASE_URL ?= postgresql://postgres@127.0.0.1:5432/postgres
DND_TEST_REDIS_URL ?= redis://127.0.0.1:6379/0
DND_TEST_AMQP_URL ?= amqp://guest:guest@127.0.0.1:5672//
export DND_TEST_DATABASE_URL DND_TEST_REDIS_URL DND_TEST_AMQP_URL

.PHONY: install test lint typecheck unit integration e2e bench format

install:
	$(PYTHON) -m pip install -e '.[dev]'

test: lint typecheck
	$(PYTHON) -m pytest

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

typecheck:
	$(PYTHON) -m mypy

unit:
	$(PYTHON) -m pytest tests/unit

integration:
	$(PYTHON) -m pytest tests/integration

e2e:
	$(PYTHON) -m pytest tests/e2e

format:
	$(PYTHON) -m ruff format .
	$(PYTHON) -m ruff check --fix .

bench:
	$(PYTHON) bench/backup_restore.py
