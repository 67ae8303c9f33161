"""`dnd-client kept ...`: the records a backup could not store, kept aside raw."""

from __future__ import annotations

import sys
import uuid

import click

from worker import exit_codes
from worker.cli.common import output_option, settings
from worker.cli.output import Output
from worker.services import open_postgres


@click.group()
def kept() -> None:
    """Records kept aside by backups: list them, read one raw, mark them resolved.

    A record lands here when it cannot be stored faithfully (invalid JSON, an
    unknown role, a NUL byte, a missing field, a bad timestamp, a session ID
    that is not a UUID...). Fix it in Redis, let the next backup store it, then
    mark it resolved.
    """


@kept.command("list")
@click.option("--all", "include_resolved", is_flag=True, help="Include resolved records.")
@click.option("--run", "run_id", metavar="RUN_ID", help="Only records last seen by this run.")
@click.option("--limit", type=click.IntRange(1, 100_000), default=50, show_default=True)
@output_option
def list_kept(include_resolved: bool, run_id: str | None, limit: int, output: str) -> int:
    """Kept-aside records, newest first (unresolved ones unless --all)."""
    if run_id is not None:
        try:
            run_id = str(uuid.UUID(run_id))
        except ValueError:
            raise click.BadParameter(f"not a run ID: {run_id!r}", param_hint="--run") from None
    with open_postgres(settings()) as pg:
        records = pg.kept_records(limit=limit, include_resolved=include_resolved, run_id=run_id)
    out = Output(output)
    out.data(
        records,
        columns=("id", "kind", "session", "key", "reason", "seen", "resolved"),
        rows=[
            (
                r["id"],
                r["kind"],
                r["session_id"],
                r["redis_key"],
                _clip(r["reason"], 70),
                r["times_seen"],
                "yes" if r["resolved_at"] else "no",
            )
            for r in records
        ],
    )
    if not records and not out.json:
        out.status("no kept records" + ("" if include_resolved else " (unresolved)"))
    return exit_codes.OK


@kept.command("show")
@click.argument("record_id", type=int)
@click.option("--raw", is_flag=True, help="Write the record's exact bytes to stdout.")
@output_option
def show_kept(record_id: int, raw: bool, output: str) -> int:
    """One kept record in full (or its exact raw bytes with --raw)."""
    with open_postgres(settings()) as pg:
        record = pg.kept_record(record_id)
    if record is None:
        raise click.BadParameter(f"no kept record {record_id}", param_hint="RECORD_ID")
    if raw:
        sys.stdout.buffer.write(bytes(record["raw"]))
        sys.stdout.buffer.flush()
        return exit_codes.OK
    record["raw"] = bytes(record["raw"]).decode("utf-8", "backslashreplace")
    out = Output(output)
    out.data(record, columns=("field", "value"), rows=list(record.items()))
    return exit_codes.OK


@kept.command("resolve")
# IDs are bigint: a larger number is a bad argument, not a PostgreSQL error.
@click.argument("record_ids", type=click.IntRange(1, 2**63 - 1), nargs=-1, required=True)
@output_option
def resolve_kept(record_ids: tuple[int, ...], output: str) -> int:
    """Mark kept records resolved (fixed in Redis, or deliberately dropped)."""
    with open_postgres(settings()) as pg:
        count = pg.resolve_kept_records(list(record_ids))
    out = Output(output)
    out.data({"resolved": count})
    if not out.json:
        out.status(f"resolved {count} record(s)")
    return exit_codes.OK


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
