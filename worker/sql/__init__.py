"""The SQL the PostgreSQL store runs, loaded from ``queries.sql``.

Queries live in a .sql file as named blocks (``-- name: x``), as procrastinate
does: they read as SQL, psql can run them, and no query is ever assembled from
strings at run time.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString, cast

_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> dict[str, LiteralString]:
    text = resources.files(__package__).joinpath("queries.sql").read_text(encoding="utf-8")
    parts = _NAME.split(text)
    queries: dict[str, LiteralString] = {}
    # parts = [preamble, name1, body1, name2, body2, ...]
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise RuntimeError(f"query {name!r} is defined twice in queries.sql")
        # The file is part of the package, not input: it is as literal as a
        # string constant in the code, which is what LiteralString asks for.
        queries[name] = cast(LiteralString, body.strip())
    return queries


QUERIES = _load()
