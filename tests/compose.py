"""docker-compose.yml read as `docker compose` reads it, for tests without a Docker engine.

The file is parsed with PyYAML (merge keys included) and its ``${...}``
references are substituted the way compose does, from .env.example. Only the
syntax compose documents is accepted (``$$``, ``$NAME``, ``${NAME}``,
``${NAME:-default}``, ``${NAME-default}``, ``${NAME:?error}``, ``${NAME?error}``,
``${NAME:+alt}``, ``${NAME+alt}``, nested in defaults); anything else fails.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class MissingVariable(Exception):
    """A ``${NAME:?message}`` whose variable is unset or empty: compose refuses to start."""


def load(path: Path = COMPOSE_FILE) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict)
    return data


def dotenv(path: Path = ENV_EXAMPLE) -> dict[str, str]:
    """KEY=VALUE lines (comments, blank lines and optional quotes as compose reads them)."""
    values: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}:{number}: not KEY=VALUE: {line!r}"
        assert _NAME.fullmatch(name), f"{path.name}:{number}: not a variable name: {name!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = re.sub(r"\s+#.*$", "", value)
        values[name] = value
    return values


def interpolate(text: str, variables: Mapping[str, str]) -> str:
    out: list[str] = []
    i = 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
        elif text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _closing_brace(text, i + 2)
            out.append(_expand(text[i + 2 : end], variables))
            i = end + 1
        else:
            match = _NAME.match(text, i + 1)
            assert match, f"a lone $ (write $$ for a literal one): {text!r}"
            out.append(variables.get(match.group(), ""))
            i = match.end()
    return "".join(out)


def _closing_brace(text: str, start: int) -> int:
    depth, j = 1, start
    while j < len(text):
        if text.startswith("${", j):
            depth, j = depth + 1, j + 2
            continue
        if text[j] == "}":
            depth -= 1
            if depth == 0:
                return j
        j += 1
    raise AssertionError(f"unclosed ${{ in {text!r}")


def _expand(body: str, variables: Mapping[str, str]) -> str:
    match = _NAME.match(body)
    assert match, f"not a variable name: ${{{body}}}"
    name, rest = match.group(), body[match.end() :]
    value = variables.get(name)
    if rest == "":
        return value or ""
    for op in (":-", ":?", ":+", "-", "?", "+"):
        if rest.startswith(op):
            arg = rest[len(op) :]
            break
    else:
        raise AssertionError(f"unsupported substitution: ${{{body}}}")
    empty_counts = op.startswith(":")
    is_set = value is not None and (value != "" or not empty_counts)
    if op.endswith("-"):
        return value if is_set and value is not None else interpolate(arg, variables)
    if op.endswith("?"):
        if not is_set or value is None:
            raise MissingVariable(f"{name}: {interpolate(arg, variables)}")
        return value
    return interpolate(arg, variables) if is_set else ""


def interpolate_all(node: Any, variables: Mapping[str, str]) -> Any:
    """The whole file with every string substituted (as `docker compose config` shows it)."""
    if isinstance(node, str):
        return interpolate(node, variables)
    if isinstance(node, list):
        return [interpolate_all(item, variables) for item in node]
    if isinstance(node, dict):
        return {key: interpolate_all(value, variables) for key, value in node.items()}
    return node


def referenced_variables(node: Any) -> set[str]:
    """Every variable the file substitutes (``$$NAME`` is the container's, not compose's)."""
    if isinstance(node, str):
        text = node.replace("$$", "")
        return set(re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", text))
    if isinstance(node, list):
        return set().union(*(referenced_variables(item) for item in node))
    if isinstance(node, dict):
        return set().union(*(referenced_variables(value) for value in node.values()))
    return set()


def environment(service: Mapping[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's forms (mapping or KEY=VALUE list)."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.partition("=")[::2] for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}
