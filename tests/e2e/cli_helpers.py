"""Helpers of the command-line tests (test_cli_*.py): running `dnd-client`, reading its output.

The exit statuses are written out as numbers on purpose: they are what users'
scripts test, so a test must notice if one changes.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psycopg

from tests.processes import REPO, base_env, run_cli

OK, USAGE, PARTIAL, RUN_FAILED, UNAVAILABLE, NO_WORKERS, CONFIG, SCHEMA = 0, 2, 3, 4, 5, 6, 7, 8
INTERRUPTED = 130

MISSING_ID = "00000000-0000-4000-8000-000000000000"


def cli(env: Mapping[str, str], *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """`dnd-client ARGS` with stdin a pipe (never the terminal pytest may run in)."""
    return run_cli(env, *args, timeout=90, stdin=stdin)


def cli_bytes(env: Mapping[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    """Like cli(), with stdout and stderr as bytes (for --raw)."""
    return subprocess.run(
        [sys.executable, str(REPO / "bin" / "dnd-client"), *args],
        cwd=REPO,
        env=base_env(env),
        capture_output=True,
        timeout=90,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def cli_json(env: Mapping[str, str], *args: str, status: int = OK) -> Any:
    """Run with `-o json`, check the exit status, return the parsed stdout."""
    done = cli(env, *args, "-o", "json")
    assert done.returncode == status, describe(done)
    return json.loads(done.stdout)


def describe(done: subprocess.CompletedProcess[Any]) -> str:
    args = [str(arg) for arg in done.args]
    if len(args) > 1 and args[1].endswith("dnd-client"):
        args = ["dnd-client", *args[2:]]
    return (
        f"{' '.join(args)}: exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    )


def stderr_on_tty(env: Mapping[str, str], *args: str, timeout: float = 60) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal; returns (exit status, stdout, what the tty got)."""
    master, slave = pty.openpty()
    received = bytearray()
    with tempfile.TemporaryFile() as stdout:
        try:
            proc = subprocess.Popen(
                [sys.executable, str(REPO / "bin" / "dnd-client"), *args],
                cwd=REPO,
                env=base_env(env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=slave,
            )
        finally:
            os.close(slave)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                ready, _, _ = select.select([master], [], [], 0.5)
                if not ready:
                    continue
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the last writer closed the terminal
                    break
                if not chunk:
                    break
                received += chunk
            else:
                proc.kill()
                raise AssertionError(f"{args} did not finish within {timeout} s: {received!r}")
            code = proc.wait(timeout)
        finally:
            os.close(master)
        stdout.seek(0)
        return code, stdout.read().decode(), received.decode(errors="replace")


def stdin_on_tty(
    env: Mapping[str, str], *args: str, typed: bytes = b"", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run with stdin on a pseudo-terminal on which ``typed`` is typed; stdout/stderr piped."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, str(REPO / "bin" / "dnd-client"), *args],
            cwd=REPO,
            env=base_env(env),
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        os.close(slave)
        if typed:
            os.write(master, typed)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"{args} still waiting after {timeout} s: {err}") from None
    finally:
        os.close(master)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def summary(stdout: str) -> dict[str, str]:
    """The closing summary of a run (a two-column table without header) as a dict."""
    rows = {}
    for line in stdout.splitlines():
        if not line.strip():
            break  # a table of failed sessions may follow
        label, *value = re.split(r" {2,}", line, maxsplit=1)
        rows[label] = value[0] if value else ""
    return rows


def table(text: str) -> list[dict[str, str]]:
    """A table with a header and a dashes line under it, as a list of rows."""
    lines = text.splitlines()
    for i, line in enumerate(lines[1:], start=1):
        if line and set(line) <= {"-", " "}:
            header, body = lines[i - 1], lines[i + 1 :]
            spans = [m.span() for m in re.finditer(r"-+", line)]
            break
    else:
        raise AssertionError(f"no table in:\n{text}")
    spans[-1] = (spans[-1][0], None)  # the last column is not padded
    names = [header[a:b].strip() for a, b in spans]
    rows = []
    for row in body:
        if not row.strip():
            break
        rows.append({name: row[a:b].strip() for name, (a, b) in zip(names, spans, strict=True)})
    return rows


def assert_one_error_line(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    """stderr says what went wrong in one line holding ``expected``; returns that line."""
    assert "Traceback" not in done.stderr, describe(done)
    errors = [
        line
        for line in done.stderr.splitlines()
        if re.match(r"(dnd-client: )?error:", line, re.IGNORECASE)
    ]
    assert len(errors) == 1, describe(done)
    for text in expected:
        assert text in errors[0], describe(done)
    return errors[0]


def assert_no_password(done: subprocess.CompletedProcess[str], password: str) -> None:
    assert password not in done.stdout + done.stderr, describe(done)


def migration_ids() -> list[str]:
    """The migrations of the checkout, in order."""
    return sorted(
        p.name.removesuffix(".sql")
        for p in (REPO / "migrations").glob("*.sql")
        if not p.name.endswith(".rollback.sql")
    )


def table_exists(database_url: str, name: str) -> bool:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()
        assert row is not None
        return bool(row[0])


def run_count(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT count(*) FROM persistence_snapshots").fetchone()
    assert row is not None
    return int(row[0])


def stored_counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    """(sessions, messages) in PostgreSQL."""
    row = conn.execute(
        "SELECT (SELECT count(*) FROM client_sessions), (SELECT count(*) FROM client_messages)"
    ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def venv_script(name: str) -> Path:
    """A console script installed next to this Python (dnd-client, yoyo)."""
    path = Path(sys.executable).with_name(name)
    assert path.exists(), f"{path} is not installed (pip install -e '.[dev]')"
    return path
