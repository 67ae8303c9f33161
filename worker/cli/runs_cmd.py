"""`dnd-client backup ...` and `dnd-client restore ...`: start runs, list them, show one."""

from __future__ import annotations

import click

from worker.cli import exit_codes
from worker.cli.common import (
    F,
    local_option,
    one_of_all_or_session,
    output_option,
    session_option,
    settings,
)
from worker.cli.output import Output, ProgressBar, format_duration, run_exit_status
from worker.models import Run, RunStatus, SessionStatus
from worker.services import open_postgres, open_services

WAIT_OPTIONS = [
    click.option("--no-wait", is_flag=True,
                 help="Hand the run to the workers, print its ID and return at once."),
    click.option("--timeout", type=click.FloatRange(min=1), default=None, metavar="SECONDS",
                 help="Stop waiting after this long (the run goes on); default: wait until done."),
]


def _wait_options(func: F) -> F:
    for option in reversed(WAIT_OPTIONS):
        func = option(func)
    return func


# -- backup -------------------------------------------------------------------


@click.group(invoke_without_command=True)
@click.option("--all", "all_sessions", is_flag=True,
              help="Back up every session in the sessions set.")
@session_option("Back up")
@click.option("--full", is_flag=True,
              help="Read every message again instead of only what changed (slower; also "
                   "picks up messages edited or replaced in place).")
@local_option
@_wait_options
@output_option
@click.pass_context
def backup(ctx: click.Context, all_sessions: bool, session_id: str | None, full: bool,
           local: bool, no_wait: bool, timeout: float | None, output: str) -> int | None:
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
    return _start("backup", session_id=session_id, local=local, no_wait=no_wait,
                  timeout=timeout, output=output, full=full)


@backup.command("list")
@click.option("--limit", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many runs to show.")
@click.option("--kind", type=click.Choice(["all", "backup", "restore", "verify"]),
              default="all", show_default=True, help="Only runs of this kind.")
@output_option
def list_runs(limit: int, kind: str, output: str) -> int:
    """The latest runs (backups, restores, verifies), newest first."""
    with open_postgres(settings()) as pg:
        runs = pg.list_runs(limit=limit, kind=None if kind == "all" else kind)
    out = Output(output)
    out.data(
        [r.as_dict() for r in runs],
        columns=("started", "run", "kind", "scope", "status", "sessions", "messages", "kept",
                 "failed", "duration"),
        rows=[
            (r.created_at.astimezone(), r.id, r.kind, _scope(r), r.status.value,
             _sessions(r), r.message_count, r.kept_count, r.failed_count,
             format_duration(r.duration_ms) if r.done else "running")
            for r in runs
        ],
    )
    if not runs and not out.json:
        out.status("no runs yet")
    return exit_codes.OK


@backup.command("show")
@click.argument("run_id", metavar="RUN_ID")
@click.option("--sessions", "show_sessions", type=click.Choice(["problems", "all"]),
              default="problems", show_default=True,
              help="Which per-session results to list.")
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
        results = [r for r in results
                   if r.status in (SessionStatus.FAILED, SessionStatus.PARTIAL) or r.error]
    out = Output(output)
    if out.json:
        payload = run.as_dict()
        payload["sessions"] = [r.as_dict() for r in results]
        out.data(payload)
    else:
        out.run(run)
        if results:
            out.stdout.write("\n")
            out.data(None, columns=("session", "status", "messages", "kept", "shard", "worker",
                                    "error"),
                     rows=[(r.session_id, r.status.value, r.messages, r.kept, r.shard, r.worker,
                            r.error) for r in results])
    return run_exit_status(run)


# -- restore ------------------------------------------------------------------


@click.command()
@click.option("--all", "all_sessions", is_flag=True,
              help="Restore every session in PostgreSQL (soft-deleted ones never are).")
@session_option("Restore")
@click.option("--force", is_flag=True,
              help="Replace sessions that exist in Redis (their hash and all their messages; "
                   "messages never backed up are lost). Without it they are skipped.")
@local_option
@_wait_options
@output_option
def restore(all_sessions: bool, session_id: str | None, force: bool, local: bool,
            no_wait: bool, timeout: float | None, output: str) -> int:
    """Restore sessions from PostgreSQL into Redis (--all, or --session ID).

    A session that already exists in Redis is skipped unless --force; a
    soft-deleted session is never restored. Each session appears in Redis all at
    once: the application never sees half of one.
    """
    one_of_all_or_session(all_sessions, session_id)
    return _start("restore", session_id=session_id, local=local, no_wait=no_wait,
                  timeout=timeout, output=output, force=force)


# -- shared -------------------------------------------------------------------


def _start(kind: str, *, session_id: str | None, local: bool, no_wait: bool,
           timeout: float | None, output: str, full: bool = False, force: bool = False) -> int:
    out = Output(output)
    if local:
        if no_wait:
            raise click.UsageError("--no-wait needs the workers; it cannot go with --local")
        return _report(_run_local(kind, session_id=session_id, full=full, force=force), out)
    from worker.cli.dispatch import run_on_workers

    run = run_on_workers(kind, session_id=session_id, full=full, force=force,
                         no_wait=no_wait, timeout=timeout, out=out)
    if run is None:  # --no-wait: the run ID was printed
        return exit_codes.OK
    return _report(run, out)


def _run_local(kind: str, *, session_id: str | None, full: bool, force: bool) -> Run:
    from worker.runner import backup_run, restore_run

    bar = ProgressBar("backing up" if kind == "backup" else "restoring")
    with open_services(settings()) as services:
        try:
            if kind == "backup":
                return backup_run(services, session_id=session_id, full=full, progress=bar)
            return restore_run(services, session_id=session_id, force=force, progress=bar)
        finally:
            bar.close()


def _report(run: Run, out: Output) -> int:
    failed = []
    if run.failed_count:
        with open_postgres(settings()) as pg:
            failed = [r for r in pg.run_results(run.id) if r.status is SessionStatus.FAILED]
    out.run(run, failed=failed)
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
