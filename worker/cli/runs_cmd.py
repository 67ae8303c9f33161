"""`dnd-client backup ...` and `dnd-client restore ...`: start runs, list them, show one."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import ClassVar
from urllib.parse import urlsplit

import click

from worker import exit_codes
from worker.cli.common import (
    local_option,
    one_of_all_or_session,
    output_option,
    session_option,
    settings,
    wait_options,
)
from worker.cli.history_cmd import settled, undo_hint
from worker.cli.launch import launch
from worker.cli.output import Output, ProgressBar, format_duration, run_exit_status
from worker.models import BackupOptions, RestoreOptions, Run, RunOptions, RunStatus, SessionStatus
from worker.services import open_postgres, open_services


class _Duration(click.ParamType):  # type: ignore[type-arg]
    """An age like 30d, 12h, 90m, 2w or 45s; a bare number is days."""

    name = "duration"
    _UNITS: ClassVar[dict[str, str]] = {
        "s": "seconds",
        "m": "minutes",
        "h": "hours",
        "d": "days",
        "w": "weeks",
    }

    def convert(
        self, value: object, param: click.Parameter | None, ctx: click.Context | None
    ) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", str(value))
        if match is None:
            self.fail(f"{value!r} is not an age like 30d, 12h, 90m or 2w", param, ctx)
        amount, unit = int(match.group(1)), match.group(2) or "d"
        try:
            age = timedelta(**{self._UNITS[unit]: amount})
        except OverflowError:
            age = timedelta.max
        if age >= datetime.now(UTC) - datetime(1, 1, 1, tzinfo=UTC):
            self.fail(f"{value!r} goes back before the year 1", param, ctx)
        return age


DURATION = _Duration()

# -- backup -------------------------------------------------------------------


@click.group(invoke_without_command=True)
@click.option(
    "--all", "all_sessions", is_flag=True, help="Back up every session in the sessions set."
)
@session_option("Back up")
@click.option(
    "--full",
    is_flag=True,
    help="Read every message again instead of only what changed (slower; also "
    "picks up messages edited or replaced in place).",
)
@local_option
@wait_options
@output_option
@click.pass_context
def backup(
    ctx: click.Context,
    all_sessions: bool,
    session_id: str | None,
    full: bool,
    local: bool,
    no_wait: bool,
    timeout: float | None,
    output: str,
) -> int | None:
    """Back up sessions from Redis into PostgreSQL (--all, or --session ID).

    Sessions are upserted by ID and only what changed since the last backup is
    read; messages are stored once each. Records that cannot be stored are kept
    aside with the reason (see `dnd-client kept list`); the run is then `partial`.

    \b
    Subcommands:
      list   the latest runs, newest first
      show   one run and its per-session results
    """
    if ctx.invoked_subcommand is not None:
        if all_sessions or session_id or full or local:
            raise click.UsageError("--all/--session/--full/--local go without a subcommand")
        return None
    one_of_all_or_session(all_sessions, session_id, " (or a subcommand: list, show)")
    return _start(
        BackupOptions(full=full),
        session_id=session_id,
        local=local,
        no_wait=no_wait,
        timeout=timeout,
        output=output,
    )


@backup.command("list")
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000),
    default=20,
    show_default=True,
    help="How many runs to show.",
)
@click.option(
    "--kind",
    type=click.Choice(["all", "backup", "restore", "verify"]),
    default="all",
    show_default=True,
    help="Only runs of this kind.",
)
@output_option
def list_runs(limit: int, kind: str, output: str) -> int:
    """The latest runs (backups, restores, verifies), newest first."""
    with open_postgres(settings()) as pg:
        runs = pg.list_runs(limit=limit, kind=None if kind == "all" else kind)
    out = Output(output)
    out.data(
        [r.as_dict() for r in runs],
        columns=(
            "started",
            "run",
            "kind",
            "scope",
            "status",
            "sessions",
            "messages",
            "kept",
            "failed",
            "duration",
            "as of",
        ),
        rows=[
            (
                r.created_at.astimezone(),
                r.id,
                r.kind,
                _scope(r),
                r.status.value,
                _sessions(r),
                r.message_count,
                r.kept_count,
                r.failed_count,
                format_duration(r.duration_ms) if r.done else "running",
                r.as_of.astimezone(UTC).isoformat() if r.as_of else "",
            )
            for r in runs
        ],
    )
    if not runs and not out.json:
        out.status("no runs yet")
    return exit_codes.OK


@backup.command("show")
@click.argument("run_id", metavar="RUN_ID")
@click.option(
    "--sessions",
    "show_sessions",
    type=click.Choice(["problems", "all"]),
    default="problems",
    show_default=True,
    help="Which per-session results to list.",
)
@output_option
def show_run(run_id: str, show_sessions: str, output: str) -> int:
    """One run: its totals and its per-session results."""
    import uuid

    try:
        uuid.UUID(run_id)
    except ValueError:
        raise click.BadParameter(f"not a run ID: {run_id!r}", param_hint="RUN_ID") from None
    with open_postgres(settings()) as pg:
        run = pg.get_run(run_id)
        if run is None:
            raise click.BadParameter(f"no run {run_id}", param_hint="RUN_ID")
        results = pg.run_results(run_id)
    if show_sessions == "problems":
        results = [
            r
            for r in results
            if r.status in (SessionStatus.FAILED, SessionStatus.PARTIAL) or r.error
        ]
    out = Output(output)
    if out.json:
        payload = run.as_dict()
        payload["sessions"] = [r.as_dict() for r in results]
        out.data(payload)
    else:
        out.run(run)
        if results:
            out.stdout.write("\n")
            out.data(
                None,
                columns=("session", "status", "messages", "kept", "shard", "worker", "error"),
                rows=[
                    (r.session_id, r.status.value, r.messages, r.kept, r.shard, r.worker, r.error)
                    for r in results
                ],
            )
    return run_exit_status(run)


@backup.command("prune")
@click.option(
    "--keep",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help="Keep the newest N finished runs of each kind (backup, restore, verify).",
)
@click.option(
    "--older-than",
    "older_than",
    type=DURATION,
    default=None,
    metavar="AGE",
    help="Remove runs that ended more than AGE ago: 30d, 12h, 90m, 2w (a bare number is days).",
)
@click.option(
    "--history-older-than",
    "history_older_than",
    type=DURATION,
    default=None,
    metavar="AGE",
    help="Fold history older than AGE into the state at that moment; restores "
    "--as-of before it are then refused. Beat: HISTORY_KEEP_DAYS.",
)
@click.option("--dry-run", is_flag=True, help="Count what would go; remove nothing.")
@output_option
def prune(
    keep: int | None,
    older_than: timedelta | None,
    history_older_than: timedelta | None,
    dry_run: bool,
    output: str,
) -> int:
    """Remove old run records, never backed-up data.

    Run records are the persistence_snapshots rows and their per-session
    results; kept-aside records go too once marked resolved (`dnd-client kept
    resolve`) and their last run is gone. Running runs are never removed. With
    both --keep and --older-than, a run goes only when it meets both. Beat can
    do this on a schedule: PRUNE_SCHEDULE and PRUNE_KEEP_DAYS.
    """
    if keep is None and older_than is None and history_older_than is None:
        raise click.UsageError("give --keep N, --older-than AGE, --history-older-than AGE")
    before = None if older_than is None else datetime.now(UTC) - older_than
    counts: dict[str, int] = {}
    with open_postgres(settings()) as pg:
        if keep is not None or before is not None:
            counts.update(pg.prune(keep=keep, before=before, dry_run=dry_run))
        if history_older_than is not None:
            folded = pg.fold_history(datetime.now(UTC) - history_older_than, dry_run=dry_run)
            counts.update({f"history_{name}": value for name, value in folded.items()})
    out = Output(output)
    out.data(
        {**counts, "dry_run": dry_run},
        columns=("removed" if not dry_run else "would remove", "count"),
        rows=[(name.replace("_", " "), value) for name, value in counts.items()],
    )
    return exit_codes.OK


# -- restore ------------------------------------------------------------------


@click.command()
@click.option(
    "--all",
    "all_sessions",
    is_flag=True,
    help="Restore every session in PostgreSQL (soft-deleted ones never are).",
)
@session_option("Restore")
@click.option(
    "--force",
    is_flag=True,
    help="Replace sessions that exist in Redis (their hash and all their messages; "
    "messages never backed up are lost). Without it they are skipped.",
)
@click.option(
    "--target-redis",
    metavar="URL",
    default=None,
    help="Drill: restore into this Redis instead of REDIS_URL, then verify it. "
    "The live data is never touched.",
)
@click.option(
    "--target-prefix",
    metavar="PREFIX",
    default=None,
    help="Drill: restore under this key prefix instead of REDIS_KEY_PREFIX, then "
    "verify it (on REDIS_URL unless --target-redis).",
)
@click.option(
    "--cleanup", is_flag=True, help="Drill: delete the target prefix's keys after verifying."
)
@click.option(
    "--as-of",
    "as_of",
    metavar="T",
    default=None,
    help="Restore the state the backups had captured at T (an RFC 3339 instant, "
    "or a run ID: the moment that run finished) instead of the latest.",
)
@local_option
@wait_options
@output_option
def restore(
    all_sessions: bool,
    session_id: str | None,
    force: bool,
    as_of: str | None,
    target_redis: str | None,
    target_prefix: str | None,
    cleanup: bool,
    local: bool,
    no_wait: bool,
    timeout: float | None,
    output: str,
) -> int:
    """Restore sessions from PostgreSQL into Redis (--all, or --session ID).

    A session that already exists in Redis is skipped unless --force; a
    soft-deleted session is never restored. Each session appears in Redis all at
    once: the application never sees half of one.

    \b
    A restore drill (--target-redis and/or --target-prefix) restores into
    another Redis or prefix, then verifies it against PostgreSQL: proof that
    the backup restores, at no risk. Drills run in this process, so that the
    target's password never travels through the broker.
    """
    one_of_all_or_session(all_sessions, session_id)
    options = settled(RestoreOptions(force=force, as_of=as_of))
    if target_redis is not None or target_prefix is not None:
        if no_wait:
            raise click.UsageError("a drill runs in this process; --no-wait does not apply")
        return _drill(
            session_id=session_id,
            force=force,
            as_of=options.as_of,
            target_url=target_redis,
            target_prefix=target_prefix,
            cleanup=cleanup,
            output=output,
        )
    if cleanup:
        raise click.UsageError("--cleanup is for drills (--target-redis / --target-prefix)")
    return _start(
        options,
        session_id=session_id,
        local=local,
        no_wait=no_wait,
        timeout=timeout,
        output=output,
    )


def _drill(
    *,
    session_id: str | None,
    force: bool,
    as_of: str | None,
    target_url: str | None,
    target_prefix: str | None,
    cleanup: bool,
    output: str,
) -> int:
    from worker.cli.verify_cmd import (
        problems_of,
        report_verify,
        verify_exit_status,
        verify_payload,
    )
    from worker.drill import run_drill

    if target_url is not None:
        try:
            scheme = urlsplit(target_url).scheme
        except ValueError:
            scheme = ""
        if scheme not in ("redis", "rediss", "unix"):
            raise click.BadParameter("must be a redis:// URL", param_hint="--target-redis")
    if target_prefix is not None and any(ch in target_prefix for ch in "*?[]{} \t\r\n"):
        raise click.BadParameter(
            "no glob characters, braces or spaces", param_hint="--target-prefix"
        )
    out = Output(output)
    restoring, verifying = ProgressBar("restoring (drill)"), ProgressBar("verifying (drill)")
    with open_services(settings()) as services:
        try:
            report = run_drill(
                services,
                target_url=target_url,
                target_prefix=target_prefix,
                session_id=session_id,
                force=force,
                as_of=as_of,
                cleanup=cleanup,
                restore_progress=restoring,
                verify_progress=verifying,
            )
        finally:
            restoring.close()
            verifying.close()
    out.status(f"drill target: {report.target}")
    if out.json:
        # One JSON document: the restore, then the verify with its differences.
        problems = problems_of(report.verify)
        status = verify_exit_status(report.verify, problems)
        out.data(
            {
                "target": report.target,
                "restore": report.restore.as_dict(),
                "verify": verify_payload(report.verify, problems),
                "cleaned_up_keys": report.cleaned_up,
            }
        )
    else:
        out.run(report.restore)
        out.stdout.write("\n")
        status = report_verify(report.verify, out)
        if report.cleaned_up is not None:
            out.status(f"cleaned up: {report.cleaned_up} key(s) under the target prefix")
    if report.restore.status is RunStatus.FAILED:
        return run_exit_status(report.restore)
    return status


# -- shared -------------------------------------------------------------------


def _start(
    options: RunOptions,
    *,
    session_id: str | None,
    local: bool,
    no_wait: bool,
    timeout: float | None,
    output: str,
) -> int:
    out = Output(output)
    run = launch(
        options, session_id=session_id, local=local, no_wait=no_wait, timeout=timeout, out=out
    )
    if run is None:  # --no-wait: the run ID was printed
        return exit_codes.OK
    return _report(run, out)


def _report(run: Run, out: Output) -> int:
    failed = []
    if run.failed_count:
        with open_postgres(settings()) as pg:
            failed = [r for r in pg.run_results(run.id) if r.status is SessionStatus.FAILED]
    out.run(run, failed=failed)
    if run.kind == "restore" and run.forced:
        undo_hint(run, out)
    if run.status is RunStatus.FAILED:
        reason = run.error or (failed[0].error if failed else "see the run's results")
        out.status(f"dnd-client: error: {run.kind} {run.status.value}: {reason}")
    return run_exit_status(run)


def _scope(run: Run) -> str:
    if run.scope == "session":
        return f"session {run.details.get('session_id', '?')[:8]}"
    return "all"


def _sessions(run: Run) -> str:
    if run.done or run.expected_sessions is None:
        return str(run.session_count)
    return f"?/{run.expected_sessions}"
