"""`dnd-client verify --all | --session ID`: does the backup hold what Redis holds?"""

from __future__ import annotations

from collections.abc import Sequence

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
from worker.cli.history_cmd import settled
from worker.cli.launch import launch
from worker.cli.output import Output, ProgressBar
from worker.models import Run, RunStatus, SessionResult, SessionStatus, VerifyOptions
from worker.services import open_postgres, open_services


@click.command()
@click.option(
    "--all", "all_sessions", is_flag=True, help="Verify every session in Redis or in the backup."
)
@session_option("Verify")
@click.option(
    "--quick",
    is_flag=True,
    help="Compare Redis with the checksums the last backup recorded, without "
    "reading the messages back from PostgreSQL (falls back to the full "
    "comparison for a session that does not match).",
)
@click.option(
    "--as-of",
    "as_of",
    metavar="T",
    default=None,
    help="Compare with the state the backups had captured at T (an RFC 3339 "
    "instant or a run ID), e.g. a copy restored with restore --as-of T --target-prefix P.",
)
@click.option(
    "--target-prefix",
    metavar="PREFIX",
    default=None,
    help="Verify the sessions under this key prefix (a drill's copy), in this process.",
)
@click.option(
    "--target-redis",
    metavar="URL",
    default=None,
    help="Verify the sessions in this Redis (a drill's copy), in this process.",
)
@local_option
@wait_options
@output_option
def verify(
    all_sessions: bool,
    session_id: str | None,
    quick: bool,
    as_of: str | None,
    target_prefix: str | None,
    target_redis: str | None,
    local: bool,
    no_wait: bool,
    timeout: float | None,
    output: str,
) -> int:
    """Compare Redis and PostgreSQL session by session and print what differs.

    For each session: its fields, its messages by ID and their content by
    checksum; messages missing from the backup, missing from Redis, or
    different; and whether the backup still matches the checksum recorded when
    it was made (a damaged backup). Exit status 0 only when they agree, 11 when
    they differ.
    """
    one_of_all_or_session(all_sessions, session_id)
    out = Output(output)
    options = settled(VerifyOptions(quick=quick, as_of=as_of))
    if target_prefix is not None or target_redis is not None:
        if no_wait:
            raise click.UsageError("verifying a target runs in this process; no --no-wait")
        return report_verify(_verify_target(options, session_id, target_redis, target_prefix), out)
    run = launch(
        options,
        session_id=session_id,
        local=local,
        no_wait=no_wait,
        timeout=timeout,
        out=out,
    )
    if run is None:  # --no-wait: the run ID was printed
        return exit_codes.OK
    return report_verify(run, out)


def _verify_target(
    options: VerifyOptions,
    session_id: str | None,
    target_url: str | None,
    target_prefix: str | None,
) -> Run:
    from worker.drill import verify_target

    bar = ProgressBar("verifying")
    with open_services(settings()) as services:
        try:
            return verify_target(
                services, options, target_url=target_url, target_prefix=target_prefix,
                session_id=session_id, progress=bar,
            )  # fmt: skip
        finally:
            bar.close()


def problems_of(run: Run) -> list[SessionResult]:
    """The sessions of a verify run that do not agree (or could not be checked)."""
    with open_postgres(settings()) as pg:
        results = pg.run_results(run.id)
    return [r for r in results if r.status is not SessionStatus.COMPLETED]


def verify_payload(run: Run, problems: Sequence[SessionResult]) -> dict[str, object]:
    payload = run.as_dict()
    payload["agree"] = run.status is RunStatus.COMPLETED
    payload["sessions"] = [r.as_dict() for r in problems]
    return payload


def report_verify(run: Run, out: Output) -> int:
    """Print a verify run and the sessions that differ; return the exit status."""
    problems = problems_of(run)
    if out.json:
        out.data(verify_payload(run, problems))
    else:
        out.run(run)
        if problems:
            out.stdout.write("\n")
            out.data(
                None,
                columns=("session", "status", "what differs"),
                rows=[(r.session_id, r.status.value, r.error) for r in problems[:50]],
            )
            if len(problems) > 50:
                out.stdout.write(f"... and {len(problems) - 50} more (--output json lists all)\n")
        out.status(
            "Redis and the backup agree"
            if run.status is RunStatus.COMPLETED
            else f"verify: {len(problems)} session(s) differ or failed"
        )
    return verify_exit_status(run, problems)


def verify_exit_status(run: Run, problems: Sequence[SessionResult]) -> int:
    if run.status is RunStatus.COMPLETED:
        return exit_codes.OK
    if any(r.status is SessionStatus.DIFFERENT for r in problems):
        return exit_codes.DIFFERENCES
    return exit_codes.RUN_FAILED
