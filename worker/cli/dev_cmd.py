"""`dnd-client dev`: the whole system on this machine, in the foreground (see docs/dev-stack.md)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from worker.cli.common import output_option
from worker.devstack import DEV_BACKUP_SCHEDULE

_PORT = click.IntRange(1, 65535)


@click.command()
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("dev-data"),
    show_default=True,
    envvar="DND_DEV_DATA_DIR",
    show_envvar=True,
    help="Where the servers' data, the logs and the generated Flower credentials "
    "live. Kept across restarts; delete it (stack stopped) to start afresh.",
)
@click.option(
    "--demo",
    type=click.IntRange(0, 100_000),
    default=0,
    metavar="N",
    help="Write N demo sessions with messages into the data Redis (the same N "
    "every time: those already there are kept).",
)
@click.option(
    "--flower-port",
    type=_PORT,
    metavar="PORT",
    default=5555,
    show_default=True,
    envvar="FLOWER_PORT",
    show_envvar=True,
    help="Flower's port on 127.0.0.1.",
)
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    default=None,
    envvar="METRICS_PORT",
    show_envvar=True,
    help="Port on 127.0.0.1 where beat serves the Prometheus metrics; 0: none "
    "[default: the one this data dir used last, else 9808, else any free port].",
)
@click.option(
    "--no-beat",
    is_flag=True,
    help=f"Do not start beat (it runs a full backup on BACKUP_SCHEDULE; here "
    f"{DEV_BACKUP_SCHEDULE!r}, every 5 minutes, unless that is set).",
)
@click.option(
    "--concurrency",
    "-c",
    type=click.IntRange(1, 64),
    default=2,
    show_default=True,
    envvar="DND_DEV_CONCURRENCY",
    show_envvar=True,
    help="Pool processes of the Celery worker.",
)
@click.option(
    "--redis-port",
    type=_PORT,
    metavar="PORT",
    default=None,
    envvar="DND_DEV_REDIS_PORT",
    show_envvar=True,
    help="Port of the embedded Redis [default: the one this data dir used last, "
    "else 16379, else any free port].",
)
@click.option(
    "--postgres-port",
    type=_PORT,
    metavar="PORT",
    default=None,
    envvar="DND_DEV_POSTGRES_PORT",
    show_envvar=True,
    help="Port of the embedded PostgreSQL [default: the one this data dir used "
    "last, else 15432, else any free port].",
)
@output_option
@click.option(
    "--stop-timeout",
    type=click.FloatRange(min=1),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="On Ctrl-C, how long running tasks get to finish (Celery's warm "
    "shutdown) before the worker is killed.",
)
def dev(
    data_dir: Path,
    demo: int,
    flower_port: int,
    no_flower: bool,
    metrics_port: int | None,
    no_beat: bool,
    concurrency: int,
    redis_port: int | None,
    postgres_port: int | None,
    stop_timeout: float,
    output: str,
) -> int:
    """Run the whole system here: PostgreSQL, Redis, migrations, worker, beat, Flower.

    PostgreSQL and Redis are embedded (real servers shipped in pip packages,
    listening on 127.0.0.1, data in --data-dir) unless DATABASE_URL, REDIS_URL,
    CELERY_BROKER_URL or CELERY_RESULT_BACKEND is set: each one set is used
    instead. Flower asks for FLOWER_BASIC_AUTH's credentials if set, else for
    ones generated once and kept in the data dir.

    When all is up it prints the URLs, the credentials and `export` lines for
    another terminal, then stays in the foreground. A Celery process that dies
    is restarted; Ctrl-C stops everything (running tasks may finish first).
    """
    # Imported here: the other commands do not pay for psutil and the stack's modules.
    from worker.devstack.stack import Console, DevStack, Options

    options = Options(
        data_dir=data_dir,
        demo=demo,
        flower_port=flower_port,
        redis_port=redis_port,
        postgres_port=postgres_port,
        concurrency=concurrency,
        beat=not no_beat,
        flower=not no_flower,
        metrics_port=metrics_port,
        stop_timeout=stop_timeout,
        output=output,
    )
    # The CLI boundary: the children get this environment, plus the stack's URLs.
    return DevStack(options, os.environ, Console(sys.stdout, sys.stderr)).run()
