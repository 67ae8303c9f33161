"""`dnd-client history`, and what `restore --as-of` shares with it.

History is what the backups recorded of each session over time
(docs/architecture.md, "History"); a restore or a verify "as of T" uses it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from worker import exit_codes
from worker.cli.common import output_option, session_option, settings
from worker.cli.output import Output
from worker.models import Run, RunOptions
from worker.runs import settle_moment
from worker.services import open_postgres

OptionsT = TypeVar("OptionsT", bound=RunOptions)

SESSION_FIELDS = (
    "name", "creator_id", "mcp_server_url", "websocket_key", "created_at", "updated_at",
    "max_players", "settings", "status", "deleted_at",
)  # fmt: skip


def settled(options: OptionsT) -> OptionsT:
    """Options with ``as_of`` settled to an instant (bad ones: one line, exit 2)."""
    if getattr(options, "as_of", None) is None:
        return options
    with open_postgres(settings()) as pg:
        return settle_moment(pg, options)  # type: ignore[return-value]


def undo_hint(run: Run, out: Output) -> None:
    """After a forced restore into the live data: how to bring back what it replaced."""
    if run.details.get("drill"):
        return
    with open_postgres(settings()) as pg:
        results = pg.run_results(run.id)
    undo = sorted(
        (r.session_id, r.details["undo_as_of"])
        for r in results
        if r.details and r.details.get("undo_as_of")
    )
    if not undo:
        return
    if run.scope == "session" and len(undo) == 1:
        sid, moment = undo[0]
        out.status(f"to undo: dnd-client restore --session {sid} --as-of {moment} --force")
        return
    out.status(
        f"to undo: each replaced session was captured into history first; "
        f"dnd-client restore --session ID --as-of <its undo_as_of> --force brings one back "
        f"(dnd-client backup show {run.id} --sessions all -o json lists them: "
        f"{len(undo)} session(s), from {undo[0][1]})"
    )


@click.command()
@session_option("Show the history of")
@output_option
def history(session_id: str | None, output: str) -> int:
    """The captured versions of a session: when, and what changed.

    Each backup that found the session changed recorded one capture: its
    messages and top score, whether the session hash changed (and which
    fields), and the messages added, removed from Redis, edited in place or
    arrived late. `restore --session ID --as-of T` brings back the state of
    the last capture at or before T.
    """
    if session_id is None:
        raise click.UsageError("give --session ID")
    with open_postgres(settings()) as pg:
        found = pg.session_history(session_id)
        current = pg.sessions([session_id]).get(session_id)
    captures = describe(found, current)
    out = Output(output)
    out.data(
        captures,
        columns=("captured", "run", "messages", "changed", "note"),
        rows=[
            (
                c["captured_at"].astimezone(UTC).isoformat(),
                (c["snapshot_id"] or "")[:8],
                c["message_count"],
                summary(c),
                c["note"] or "",
            )
            for c in captures
        ],
    )
    if not captures and not out.json:
        out.status(f"no history of session {session_id}")
    return exit_codes.OK


def describe(found: dict[str, list[dict[str, Any]]], current: Any) -> list[dict[str, Any]]:
    """Each capture with the hash fields it changed and the messages it noted."""
    versions = found["versions"]
    by_time: dict[datetime, dict[str, list[str]]] = {}
    for change in found["messages"]:
        by_time.setdefault(change["captured_at"], {}).setdefault(change["change"], []).append(
            change["message_id"]
        )
    out = []
    for capture in found["captures"]:
        at = capture["captured_at"]
        fields = _fields_changed(versions, at, current)
        out.append({**capture, "hash_fields": fields, "message_changes": by_time.get(at, {})})
    return out


def _fields_changed(versions: list[dict[str, Any]], at: datetime, current: Any) -> list[str]:
    """The session fields that the capture at ``at`` changed (from the rows it replaced)."""
    for index, old in enumerate(versions):
        if old["replaced_at"] != at:
            continue
        new = versions[index + 1] if index + 1 < len(versions) else _row_of(current)
        return [f for f in SESSION_FIELDS if new is not None and old[f] != new[f]]
    return []


def _row_of(session: Any) -> dict[str, Any] | None:
    return None if session is None else {f: getattr(session, f) for f in SESSION_FIELDS}


def summary(capture: dict[str, Any]) -> str:
    parts = []
    if capture["hash_fields"]:
        parts.append("hash: " + ", ".join(capture["hash_fields"]))
    elif capture["hash_changed"]:
        parts.append("hash: first seen")
    for key, label in (("added", "added"), ("removed", "removed"), ("edited", "edited"),
                       ("late", "late")):  # fmt: skip
        if capture[key]:
            parts.append(f"{capture[key]} {label}")
    return "; ".join(parts) or "-"
