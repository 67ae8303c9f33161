"""What the CLI prints: data to stdout (a table or JSON), progress and status to stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import click

from worker import exit_codes
from worker.models import Run, RunStatus, RunTotals, SessionResult


class Output:
    """Renders results as a table (for people) or JSON (for programs)."""

    def __init__(self, fmt: str, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.fmt = fmt
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr

    @property
    def json(self) -> bool:
        return self.fmt == "json"

    def data(
        self,
        payload: Any,
        *,
        columns: Sequence[str] | None = None,
        rows: Sequence[Sequence[Any]] | None = None,
    ) -> None:
        """Print ``payload`` as JSON, or ``rows`` under ``columns`` as a table."""
        if self.json:
            self.stdout.write(json.dumps(payload, indent=2, default=_json_default) + "\n")
        elif columns is not None and rows is not None:
            self.stdout.write(render_table(columns, rows))
        self.stdout.flush()

    def status(self, message: str) -> None:
        """A status line for people: stderr, so that stdout stays parseable."""
        click.echo(message, file=self.stderr)

    def run(self, run: Run, *, failed: Sequence[SessionResult] = ()) -> None:
        """A run's closing summary (and, in tables, the sessions that failed)."""
        if self.json:
            payload = run.as_dict()
            payload["failed_sessions"] = [r.as_dict() for r in failed]
            self.data(payload)
            return
        rows = [
            ("run", run.id),
            (
                "kind",
                f"{run.kind} ({'one session' if run.scope == 'session' else 'all sessions'})"
                + (", forced" if run.forced else "")
                + (f", drill into {run.details.get('target')}" if run.details.get("drill") else ""),
            ),
            ("status", run.status.value),
            *([("as of", run.as_of.astimezone(UTC).isoformat())] if run.as_of else []),
            ("sessions", run.session_count),
            ("messages", run.message_count),
            ("records kept aside", run.kept_count),
            ("failed sessions", run.failed_count),
            ("duration", format_duration(run.duration_ms)),
        ]
        if run.details.get("unchanged"):
            rows.append(("unchanged since the last backup", run.details["unchanged"]))
        if run.details.get("skipped"):
            # Restore: already in Redis (no --force) or soft-deleted; backup: gone
            # from Redis since the listing. `backup show RUN --sessions all` says which.
            rows.append(("sessions skipped", run.details["skipped"]))
        deleted = run.details.get("soft_deleted_not_restored")
        if deleted:
            rows.append(("soft-deleted (never restored)", deleted))
        if run.error:
            rows.append(("error", run.error))
        self.stdout.write(render_table(("", ""), rows, header=False))
        if failed:
            self.stdout.write("\n")
            self.stdout.write(
                render_table(
                    ("failed session", "error"),
                    [(r.session_id, r.error or "") for r in failed[:20]],
                )
            )
            if len(failed) > 20:
                self.stdout.write(f"... and {len(failed) - 20} more (--output json lists all)\n")
        if run.kept_count:
            self.status(
                "records kept aside: dnd-client kept list (or the persistence_kept_records table)"
            )
        self.stdout.flush()


class ProgressBar:
    """Progress of a run on stderr: a bar on a terminal, nothing when piped."""

    def __init__(
        self, label: str, stream: TextIO | None = None, enabled: bool | None = None
    ) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.totals = RunTotals()
        self._bar: Any = None

    def start(self, run: Run, total: int) -> None:
        if self.enabled and total > 1:
            self._bar = click.progressbar(
                length=total,
                label=self.label,
                file=self.stream,
                show_pos=True,
                show_eta=True,
                item_show_func=lambda _: f"{self.totals.messages} messages",
            )
            self._bar.__enter__()

    def advance(self, results: Sequence[SessionResult]) -> None:
        for result in results:
            self.totals.add(result)
        if self._bar is not None:
            self._bar.update(len(results), None)

    def set_done(self, done: int, messages: int) -> None:
        """For runs watched from outside (the workers report, we poll)."""
        self.totals.messages = messages
        if self._bar is not None:
            self._bar.update(done - self._bar.pos, None)

    def close(self) -> None:
        if self._bar is not None:
            bar, self._bar = self._bar, None
            bar.__exit__(None, None, None)


def render_table(
    columns: Sequence[str], rows: Sequence[Sequence[Any]], *, header: bool = True
) -> str:
    cells = [[_cell(value) for value in row] for row in rows]
    widths = [len(c) for c in columns]
    for row in cells:
        for i, value in enumerate(row):
            widths[i] = max(widths[i], len(value))
    lines = []
    if header:
        lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
        lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def format_duration(ms: int | None) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 120:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


def run_exit_status(run: Run) -> int:
    return {
        RunStatus.COMPLETED: exit_codes.OK,
        RunStatus.PARTIAL: exit_codes.PARTIAL,
        RunStatus.FAILED: exit_codes.RUN_FAILED,
        RunStatus.RUNNING: exit_codes.OK,
    }[run.status]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    text = str(value)
    return text.replace("\n", " ")


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes | memoryview):
        return bytes(value).decode("utf-8", "backslashreplace")
    raise TypeError(f"cannot serialise {type(value).__name__}")
