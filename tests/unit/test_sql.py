"""worker.sql: the named queries of queries.sql."""

import re
from dataclasses import fields
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


# -- rows by name ---------------------------------------------------------------
# Every query the store reads into a dataclass (a pg_store.Rows) must name its
# columns after the dataclass's fields: psycopg's class_row/kwargs_row build the
# objects by column name. The same check against a real server, which also
# catches a column PostgreSQL names otherwise, is in
# tests/integration/test_row_names.py.

ROWS = sorted(
    (value for value in vars(worker.pg_store).values() if isinstance(value, worker.pg_store.Rows)),
    key=lambda rows: rows.query,
)


def _top_level(text: str) -> list[int]:
    """The parenthesis depth at every character (0 outside parentheses and strings)."""
    depths, depth, quoted = [], 0, False
    for char in text:
        if char == "'":
            quoted = not quoted
        elif not quoted and char == "(":
            depth += 1
        elif not quoted and char == ")":
            depth -= 1
        depths.append(1 if quoted else depth)
    return depths


def _keywords(text: str, word: str) -> list[re.Match[str]]:
    depths = _top_level(text)
    return [m for m in re.finditer(rf"\b{word}\b", text, re.I) if depths[m.start()] == 0]


def output_columns(query: str) -> list[str]:
    """The names of the columns a query returns, parsed from its SQL.

    Every output column must be a plain column reference or carry an alias: a
    cast or an expression would otherwise be named by PostgreSQL's rules.
    """
    text = re.sub(r"--[^\n]*", "", query).rstrip().rstrip(";")
    returning = _keywords(text, "RETURNING")
    if returning:
        columns = text[returning[-1].end() :]
    else:
        select = _keywords(text, "SELECT")[-1]
        start = select.end()
        end = next(m.start() for m in _keywords(text, "FROM") if m.start() > start)
        columns = text[start:end]
    depths = _top_level(columns)
    items, last = [], 0
    for index, char in enumerate(columns):
        if char == "," and depths[index] == 0:
            items.append(columns[last:index])
            last = index + 1
    items.append(columns[last:])
    names = []
    for item in (" ".join(i.split()) for i in items):
        named = re.fullmatch(r".+ AS (\w+)", item, re.I) or re.fullmatch(r"(?:\w+\.)?(\w+)", item)
        assert named, f"column {item!r} needs an alias"
        names.append(named.group(1))
    return names


def test_the_store_reads_dataclasses_through_rows():
    # Guards the test below against a discovery that silently finds nothing.
    assert {rows.query for rows in ROWS} >= {"get_run", "sessions", "run_results", "watermarks"}


@pytest.mark.parametrize("rows", ROWS, ids=lambda rows: rows.query)
def test_row_queries_name_their_columns_after_the_fields(rows):
    # By name: the order is free, but no field may be missing, extra or twice.
    assert sorted(output_columns(QUERIES[rows.query])) == sorted(f.name for f in fields(rows.cls))


def test_output_columns_wants_an_alias_for_a_cast():
    with pytest.raises(AssertionError, match="needs an alias"):
        output_columns("SELECT id::text, name FROM t")
    assert output_columns("SELECT id::text AS id, t.name FROM t WHERE x IN (SELECT 1)") == [
        "id",
        "name",
    ]
