"""What the documents promise agrees with the code: settings and exit statuses.

README.md's settings table and docs/contract.md §5 list every variable
``Settings.from_env`` reads, with the default it uses; both exit status tables
(README.md, docs/contract.md §4) list the statuses of worker.exit_codes.
"""

from __future__ import annotations

import ast
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from worker import exit_codes
from worker.settings import POSTGRES_DEFAULTS, Settings

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
CONTRACT = REPO / "docs" / "contract.md"
# Documented as a rule ("built from POSTGRES_*"), not as a literal default.
NOT_LITERAL = frozenset({"DATABASE_URL"})


class _Recording(dict[str, str]):
    """An empty environment that notes every variable asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.read: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        return super().get(key, default)


def _section(path: Path, heading: str) -> str:
    text = path.read_text(encoding="utf-8")
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _rows(section: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``section``, as lists of cells."""
    rows = []
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _documented_defaults(section: str) -> dict[str, str | None]:
    """Variable -> its documented default (the one literal in backticks), None if not one."""
    found: dict[str, str | None] = {}
    for row in _rows(section):
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0])
        if not names or len(row) < 3:
            continue
        literals = re.findall(r"`([^`]*)`", row[2])
        for i, name in enumerate(names):
            found[name] = literals[i] if len(literals) == len(names) else None
    return found


def _code_defaults() -> dict[str, str]:
    """Variable -> the default ``Settings.from_env`` uses, as text."""
    tree = ast.parse((REPO / "worker" / "settings.py").read_text(encoding="utf-8"))
    defaults = Settings()
    found = dict(POSTGRES_DEFAULTS)
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and getattr(node.func, "id", "") == "cls"):
            continue
        for keyword in node.keywords:
            for inner in ast.walk(keyword.value):
                if isinstance(inner, ast.Constant) and re.fullmatch(
                    r"[A-Z][A-Z0-9_]+", str(inner.value)
                ):
                    found[str(inner.value)] = _as_text(getattr(defaults, str(keyword.arg)))
    found["REDIS_KEY_PREFIX"] = defaults.redis_key_prefix
    return found


def _as_text(value: Any) -> str:
    """A default as the environment variable writes it (a list: comma-separated, a flag: 1/0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return ",".join(value) if isinstance(value, tuple) else str(value)


def _variables_read() -> set[str]:
    env = _Recording()
    Settings.from_env(env)
    return env.read


@pytest.mark.parametrize(("path", "heading"), [(README, "Settings"), (CONTRACT, "§5")])
def test_every_setting_is_documented_with_its_default(path, heading):
    documented = _documented_defaults(_section(path, heading))
    missing = sorted(_variables_read() - set(documented))
    assert not missing, f"{path.name}: not in the settings table: {missing}"
    wrong = {}
    for name, value in _code_defaults().items():
        shown = documented.get(name)
        if name in NOT_LITERAL or value == "" or shown is None:
            continue
        if shown.replace("<tmp>", tempfile.gettempdir()) != value:
            wrong[name] = (shown, value)
    assert not wrong, f"{path.name}: documented default != the code's: {wrong}"


def test_settings_without_a_default_are_documented_as_empty():
    for path, heading in [(README, "Settings"), (CONTRACT, "§5")]:
        rows = {
            name: row[2]
            for row in _rows(_section(path, heading))
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", row[0])
        }
        for name, value in _code_defaults().items():
            if value == "" and name not in NOT_LITERAL:
                assert "empty" in rows[name], (path.name, name, rows[name])


def _exit_statuses() -> dict[int, str]:
    return {
        value: name
        for name, value in vars(exit_codes).items()
        if name.isupper() and isinstance(value, int)
    }


def test_the_contract_lists_every_exit_status_by_name():
    rows = _rows(_section(CONTRACT, "§4"))
    table = {int(row[0]): row[1] for row in rows if row[0].isdigit()}
    assert table == _exit_statuses()


def test_the_readme_lists_every_exit_status():
    rows = _rows(_section(README, "Using it"))
    assert {int(row[0]) for row in rows if row[0].isdigit()} == set(_exit_statuses())


def test_verify_differences_have_their_own_status():
    # Not FAILURE (1): that is an unexpected error only.
    assert exit_codes.DIFFERENCES == 11
    assert exit_codes.DIFFERENCES != exit_codes.FAILURE
