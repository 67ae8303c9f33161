"""worker.sql: the named queries of queries.sql."""

import re
from pathlib import Path

import pytest

import worker.pg_store
from worker.sql import QUERIES

PG_STORE = Path(worker.pg_store.__file__)
USED = sorted(set(re.findall(r"""QUERIES\[["'](\w+)["']\]""", PG_STORE.read_text())))


def test_queries_load():
    assert QUERIES
    assert all(isinstance(text, str) and text.strip() for text in QUERIES.values())


def test_pg_store_uses_queries():
    # Guards the test below against a grep that silently finds nothing.
    assert len(USED) >= 10


@pytest.mark.parametrize("name", USED)
def test_every_query_used_by_the_store_exists(name):
    assert name in QUERIES


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_no_query_has_a_format_placeholder(name):
    # Queries are never str.format-ted: a {} or {name} would be a leftover of one.
    assert not re.search(r"\{\w*\}", QUERIES[name]), QUERIES[name]


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_no_query_runs_into_the_next_block(name):
    # A missing "-- name:" line would glue two queries into one.
    assert "-- name:" not in QUERIES[name]


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_parameters_are_psycopg_named_placeholders(name):
    text = QUERIES[name]
    # %(name)s only; a bare %s would take positional parameters the store never passes,
    # and a lone % would break psycopg's parsing.
    without_named = re.sub(r"%\(\w+\)s", "", text)
    assert not re.search(r"%[sb]", without_named), text
