"""The CLI's way through the workers: check someone listens, send, then watch the run.

The run's ID is the ID of the task that starts it, chosen here, so the CLI
can follow the run in PostgreSQL (its snapshot row and per-session results)
from the moment a worker picks the task up.
"""

from __future__ import annotations

import gc
import time
import uuid
from typing import Any

from worker.cli.common import settings
from worker.cli.output import Output, ProgressBar
from worker.errors import NoWorkers, ServiceUnavailable, WaitTimeout
from worker.models import Run, RunKind, RunOptions
from worker.runs import KINDS
from worker.services import open_postgres
from worker.settings import Settings, redact_url

POLL_INTERVAL_S = 0.5
# With no progress for this long, check again that some worker listens.
RECHECK_WORKERS_AFTER_S = 60.0
# How long to wait for the coordinator task to say whether it started a run.
COORDINATOR_TIMEOUT_S = 120.0


def run_on_workers(
    options: RunOptions,
    *,
    session_id: str | None,
    no_wait: bool,
    timeout: float | None,
    out: Output,
) -> Run | None:
    """Start a run on the workers; wait for it and return it (None with --no-wait)."""
    from worker.celery import app
    from worker.celery_config import (
        all_queues,
        default_queue,
        full_task_name,
        session_task_name,
        shard_queue,
    )
    from worker.sharding import shard_of

    config = settings()
    kind = options.kind
    if session_id is not None:
        needed = [shard_queue(config, shard_of(session_id, config.backup_shards))]
    else:
        needed = all_queues(config)
    check_workers(app, needed, config)

    run_id = str(uuid.uuid4())
    with _broker_errors(config):
        if session_id is not None:
            kwargs = {"session_id": session_id, "run_id": run_id, **options.as_dict()}
            async_result = app.send_task(session_task_name(kind), kwargs=kwargs, task_id=run_id)
        else:
            kwargs = {"run_id": run_id, "trigger": "cli", **options.as_dict()}
            async_result = app.send_task(
                full_task_name(kind), kwargs=kwargs, task_id=run_id, queue=default_queue(config)
            )
    try:
        if no_wait:
            out.data(
                {"run_id": run_id, "kind": kind, "status": "queued"},
                columns=("run", "status"),
                rows=[(run_id, "queued")],
            )
            out.status(f"queued; follow it with: dnd-client backup show {run_id}")
            return None
        if session_id is None:
            # The coordinator answers within seconds: either it started our
            # run, or another full run of this kind was already running.
            with _broker_errors(config):
                answer = async_result.get(timeout=COORDINATOR_TIMEOUT_S, propagate=True)
            if answer.get("status") == "skipped":
                run_id = answer["running_run_id"]
                out.status(
                    f"a full {kind} is already running (run {run_id}); following it "
                    "instead of starting another"
                )
    finally:
        # Let go of the result (and the results of the tasks it started, which
        # Celery attaches to it) now: their finalisers unsubscribe from the
        # result backend, which fails noisily if it only runs at exit.
        del async_result
        gc.collect()
    return watch_run(run_id, kind=kind, timeout=timeout, needed_queues=needed)


def watch_run(
    run_id: str, *, kind: RunKind, timeout: float | None, needed_queues: list[str]
) -> Run:
    """Follow a run in PostgreSQL until it is done, with a progress bar on a terminal."""
    from worker.celery import app

    config = settings()
    bar = ProgressBar(KINDS[kind].doing)
    started = time.monotonic()
    last_change = started
    last_seen: tuple[int, int] | None = None
    bar_started = False
    try:
        with open_postgres(config) as pg:
            while True:
                run = pg.get_run(run_id)
                if run is not None:
                    if run.done:
                        return run
                    if not bar_started:
                        bar.start(run, run.expected_sessions or 1)
                        bar_started = True
                    done, messages, _kept, _failed = pg.run_progress(run_id)
                    bar.set_done(done, messages)
                    if (done, messages) != last_seen:
                        last_seen, last_change = (done, messages), time.monotonic()
                now = time.monotonic()
                if timeout is not None and now - started > timeout:
                    raise WaitTimeout(run_id, timeout)
                if now - last_change > RECHECK_WORKERS_AFTER_S:
                    # Tasks of a dead worker come back when another picks them
                    # up (late acks); meanwhile, say why nothing moves.
                    try:
                        check_workers(app, needed_queues, config)
                    except NoWorkers as exc:
                        bar.close()
                        print(f"dnd-client: waiting: {exc}", file=bar.stream)
                    last_change = now
                time.sleep(POLL_INTERVAL_S)
    finally:
        bar.close()


def check_workers(app: Any, queues: list[str], config: Settings) -> None:
    """Fail fast, with a hint, unless some worker consumes each of ``queues``."""
    with _broker_errors(config):
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
        replies = app.control.inspect(timeout=1.5).active_queues() or {}
    consumed = {q["name"] for worker_queues in replies.values() for q in worker_queues}
    missing = [q for q in queues if q not in consumed]
    if not missing:
        return
    if not consumed or len(missing) == len(queues):
        raise NoWorkers(
            f"no Celery worker is consuming {_queue_list(missing)}; start one with "
            "`celery -A worker worker` (same CELERY_BROKER_URL), or use --local"
        )
    raise NoWorkers(
        f"no worker consumes {_queue_list(missing)} (other shards have workers); start one "
        f"with `celery -A worker worker -Q {','.join(missing)}`"
    )


def _queue_list(queues: list[str]) -> str:
    if len(queues) <= 3:
        return "queue " + ", ".join(queues) if len(queues) == 1 else "queues " + ", ".join(queues)
    return f"{len(queues)} queues ({', '.join(queues[:3])}, ...)"


class _broker_errors:  # noqa: N801 - a context manager, reads like one
    """Broker or result backend down: one clear line, never a password."""

    def __init__(self, config: Settings) -> None:
        self.config = config

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None:
            return
        from celery.exceptions import TimeoutError as CeleryTimeout
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError

        if isinstance(exc, OperationalError | ConnectionError | RedisConnectionError):
            raise ServiceUnavailable(
                "the Celery broker",
                "CELERY_BROKER_URL",
                f"{redact_url(self.config.broker_url)}: {exc}",
            ) from exc
        if isinstance(exc, CeleryTimeout):
            raise NoWorkers(
                "the workers did not start the run within "
                f"{COORDINATOR_TIMEOUT_S:g} s; are they busy or stuck? (celery -A worker "
                "inspect active)"
            ) from exc
