"""Entry point of `dnd-client`: the command group and the one place errors are printed.

Every error ends here as one line on stderr (no traceback, no password) and a
named exit status (worker.exit_codes). Set DND_DEBUG=1 to get tracebacks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Mapping
from typing import NoReturn

import click

from worker import exit_codes
from worker.cli.dev_cmd import dev
from worker.cli.history_cmd import history
from worker.cli.kept_cmd import kept
from worker.cli.migrate_cmd import migrate
from worker.cli.runs_cmd import backup, restore
from worker.cli.status_cmd import status
from worker.cli.verify_cmd import verify
from worker.errors import (
    ConfigError,
    DndError,
    InvalidArgument,
    LockTimeout,
    NoWorkers,
    RunInProgress,
    SchemaNotReady,
    ServiceUnavailable,
    StoreError,
    TaskFailed,
    Terminated,
    WaitTimeout,
)
from worker.secret_files import SecretFileError, with_secret_files
from worker.settings import passwords_in

PROG = "dnd-client"
URL_VARIABLES = ("DATABASE_URL", "REDIS_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dnd-client-worker", prog_name=PROG)
def cli() -> None:
    """Back up the chat client's live sessions from Redis into PostgreSQL, and restore them.

    Settings come from the environment: REDIS_URL, REDIS_KEY_PREFIX, DATABASE_URL
    (or POSTGRES_HOST/USER/PASSWORD/DBNAME/SSLMODE), CELERY_BROKER_URL,
    CELERY_RESULT_BACKEND and more; see the README.

    \b
    Exit status: 0 ok, 1 unexpected error, 2 bad argument, 3 partial (records
    kept aside), 4 run failed, 5 server unreachable, 6 no worker, 7 bad
    setting, 8 schema not migrated, 9 timed out waiting, 10 another full run
    of this kind is running (--local), 11 verify found differences, 12
    status: recovery point above --max-lag, 130 interrupted (Ctrl-C), 143
    terminated (SIGTERM).
    """


cli.add_command(migrate)
cli.add_command(backup)
cli.add_command(restore)
cli.add_command(kept)
cli.add_command(verify)
cli.add_command(status)
cli.add_command(history)
cli.add_command(dev)


def main(argv: list[str] | None = None) -> NoReturn:
    signal.signal(signal.SIGTERM, _terminate)
    status = run(argv)
    if status in (exit_codes.INTERRUPTED, exit_codes.TERMINATED):
        # Stop now: threads still at work on a batch (--local) would keep the
        # process alive until they finish; their transactions roll back when
        # their connections close with the process. The run was marked failed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def _terminate(signum: int, frame: object) -> None:
    raise Terminated()


def run(argv: list[str] | None = None) -> int:
    debug = os.environ.get("DND_DEBUG") == "1"
    try:
        result = cli.main(args=argv, prog_name=PROG, standalone_mode=False)
    except (click.exceptions.Exit, click.Abort, click.ClickException) as exc:
        return _click_status(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        return _interrupted(exc)
    except DndError as exc:
        if debug:
            raise
        _error(str(exc))
        return _status_of(exc)
    except Exception as exc:
        if debug:
            raise
        _error(f"unexpected {type(exc).__name__}: {exc} (DND_DEBUG=1 shows the traceback)")
        return exit_codes.FAILURE
    return result if isinstance(result, int) else exit_codes.OK


def _click_status(exc: click.exceptions.Exit | click.Abort | click.ClickException) -> int:
    """The exit status of what click raised (and printed, for its own errors)."""
    if isinstance(exc, click.exceptions.Exit):
        return exc.exit_code
    if isinstance(exc, click.Abort):
        # Click turns Ctrl-C (and so our SIGTERM) into Abort.
        if isinstance(exc.__cause__, KeyboardInterrupt):
            return _interrupted(exc.__cause__)
        _error("aborted")
        return exit_codes.INTERRUPTED
    exc.show()
    return exit_codes.USAGE if isinstance(exc, click.UsageError) else exc.exit_code


def _interrupted(exc: KeyboardInterrupt) -> int:
    if isinstance(exc, Terminated):
        _error("terminated (SIGTERM)")
        return exit_codes.TERMINATED
    _error("interrupted")
    return exit_codes.INTERRUPTED


def _status_of(exc: DndError) -> int:
    if isinstance(exc, InvalidArgument):
        return exit_codes.USAGE
    if isinstance(exc, ServiceUnavailable):
        return exit_codes.UNAVAILABLE
    if isinstance(exc, NoWorkers):
        return exit_codes.NO_WORKERS
    if isinstance(exc, ConfigError):
        return exit_codes.CONFIG
    if isinstance(exc, SchemaNotReady):
        return exit_codes.SCHEMA
    if isinstance(exc, LockTimeout | StoreError | TaskFailed):
        # A server answered with an error: the run (or this step of it) failed.
        return exit_codes.RUN_FAILED
    if isinstance(exc, WaitTimeout):
        return exit_codes.TIMEOUT
    if isinstance(exc, RunInProgress):
        return exit_codes.BUSY
    return exit_codes.FAILURE


def _error(message: str) -> None:
    click.echo(f"{PROG}: error: {_scrub(message)}", file=sys.stderr)


def _scrub(message: str) -> str:
    """Remove every password we know of, whatever produced the message."""
    # From the environment, not the settings: a message may be about settings
    # that do not parse.
    # The <NAME>_FILE forms too, unless they are what is wrong.
    env: Mapping[str, str] = os.environ
    with contextlib.suppress(SecretFileError):
        env = with_secret_files(os.environ)
    urls = [env.get(name, "") for name in URL_VARIABLES]
    secrets = set(passwords_in(urls))
    secrets.add(env.get("POSTGRES_PASSWORD", ""))
    flower = env.get("FLOWER_BASIC_AUTH", "")
    secrets.update(login.partition(":")[2] for login in flower.split(","))
    for secret in sorted(secrets - {""}, key=len, reverse=True):
        if len(secret) >= 3:
            message = message.replace(secret, "***")
    return " ".join(message.split())


if __name__ == "__main__":
    main()
