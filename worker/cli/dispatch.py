"""The CLI's way through the workers: check someone listens, send, then watch the run.

The run's ID is the ID of the task that starts it, chosen here, so the CLI
can follow the run in PostgreSQL (its snapshot row and per-session results)
from the moment a worker picks the task up.
"""

from __future__ import annotations

import contextlib
import gc
import time
import uuid
from collections.abc import Callable
from typing import Any

from worker.cli.common import settings
from worker.cli.output import Output, ProgressBar
from worker.connections import one_line
from worker.errors import DndError, NoWorkers, ServiceUnavailable, TaskFailed, WaitTimeout
from worker.models import Run, RunKind, RunOptions
from worker.pg_store import PostgresStore
from worker.runs import KINDS
from worker.services import open_postgres
from worker.settings import Settings, passwords_in, redact_url

POLL_INTERVAL_S = 0.5
# With no progress for this long, look for lost work and check that some
# worker still consumes the run's queues.
STALLED_AFTER_S = 15.0


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
    check_result_backend(app, config)

    run_id = str(uuid.uuid4())
    with _broker_errors(config):
        if session_id is not None:
            kwargs = {"session_id": session_id, "run_id": run_id, **options.task_arguments()}
            task = app.send_task(session_task_name(kind), kwargs=kwargs, task_id=run_id)
        else:
            kwargs = {"run_id": run_id, "trigger": "cli", **options.task_arguments()}
            task = app.send_task(
                full_task_name(kind), kwargs=kwargs, task_id=run_id, queue=default_queue(config)
            )
    if no_wait:
        out.data(
            {"run_id": run_id, "kind": kind, "status": "queued"},
            columns=("run", "status"),
            rows=[(run_id, "queued")],
        )
        out.status(f"queued; follow it with: dnd-client backup show {run_id}")
        return None
    watch = _RunWatch(app, config, run_id, kind, task, needed, full=session_id is None)
    try:
        return watch.until_done(timeout)
    finally:
        # Let go of the result (and the results of the tasks it started, which
        # Celery attaches to it) now: their finalisers unsubscribe from the
        # result backend, which fails noisily if it only runs at exit.
        del watch, task
        gc.collect()


class _RunWatch:
    """Following a run on the workers until it ends, or until nothing can end it.

    Each poll reads the run's record and progress in PostgreSQL and the state
    of the task that started it in the result backend. The wait ends when the
    run is done; when that task failed (its error, with its exit status);
    when no worker consumes the run's queues any more; or at --timeout. When
    the run stops moving, this process also looks for lost work, as beat's
    supervise_runs does, so that a run whose worker died goes on even
    without beat.
    """

    def __init__(
        self, app: Any, config: Settings, run_id: str, kind: RunKind, task: Any,
        needed: list[str], *, full: bool,
    ) -> None:  # fmt: skip
        self.app = app
        self.config = config
        self.run_id = run_id
        self.kind = kind
        self.task = task
        self.needed = needed
        # A full run's task is its coordinator: its answer may name another run.
        self.coordinator = task if full else None
        self.bar = ProgressBar(KINDS[kind].doing)
        self.bar_started = False
        self.said: set[str] = set()
        self.last_seen: tuple[int, int] | None = None
        self.last_change = time.monotonic()

    def until_done(self, timeout: float | None) -> Run:
        started = time.monotonic()
        try:
            with open_postgres(self.config) as pg:
                while True:
                    run = self.poll(pg)
                    if run is not None:
                        return run
                    if timeout is not None and time.monotonic() - started > timeout:
                        raise WaitTimeout(self.run_id, timeout)
                    time.sleep(POLL_INTERVAL_S)
        finally:
            self.bar.close()

    def poll(self, pg: PostgresStore) -> Run | None:
        """The run when it is done; None while it goes on; raises when it cannot end."""
        self.follow_coordinator()
        run = pg.get_run(self.run_id)
        if run is not None and run.done:
            return run
        if run is not None:
            self.show_progress(pg, run)
        self.check_task()
        if time.monotonic() - self.last_change > STALLED_AFTER_S:
            self.when_stalled(pg)
            self.last_change = time.monotonic()
        return None

    def follow_coordinator(self) -> None:
        """A full run's coordinator may answer that another run of the kind was running."""
        coordinator = self.coordinator
        if coordinator is None or not _quietly(coordinator.ready):
            return
        answer = _quietly(lambda: coordinator.result)
        self.coordinator = None
        if isinstance(answer, dict) and answer.get("status") == "skipped":
            self.run_id = answer["running_run_id"]
            self.task = None
            self.say(
                f"a full {self.kind} is already running (run {self.run_id}); following it "
                "instead of starting another"
            )

    def show_progress(self, pg: PostgresStore, run: Run) -> None:
        if not self.bar_started:
            self.bar.start(run, run.expected_sessions or 1)
            self.bar_started = True
        done, messages, _kept, _failed = pg.run_progress(self.run_id)
        self.bar.set_done(done, messages)
        if (done, messages) != self.last_seen:
            self.last_seen, self.last_change = (done, messages), time.monotonic()

    def check_task(self) -> None:
        """Stop on the task's failure; say once why it is being retried."""
        if self.task is None:
            return
        state = _quietly(lambda: self.task.state)
        if state == "FAILURE":
            raise task_error(self.task.name or "the task", _quietly(lambda: self.task.result))
        if state == "RETRY":
            reason = _quietly(lambda: self.task.result)
            self.say(f"a worker is retrying the task: {reason}")

    def when_stalled(self, pg: PostgresStore) -> None:
        """No progress for a while: revive lost work, or stop if no worker is left."""
        from worker.celery_runs import supervise_runs
        from worker.supervise import describe

        with contextlib.suppress(DndError):
            for line in describe(supervise_runs(pg, worker="dnd-client")):
                self.say(line)
        try:
            check_workers(self.app, self.needed, self.config)
        except NoWorkers as exc:
            raise NoWorkers(
                f"{exc}; run {self.run_id} waits for one and goes on when it starts "
                f"(follow it: dnd-client backup show {self.run_id})"
            ) from None

    def say(self, line: str) -> None:
        if line not in self.said:
            self.said.add(line)
            self.bar.close()
            print(f"dnd-client: {line}", file=self.bar.stream)


def task_error(name: str, exc: object) -> DndError:
    """The error of a task that failed, as the CLI reports it (its exit status by its type)."""
    if isinstance(exc, DndError):
        return exc
    detail = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    return TaskFailed(f"task {name} failed: {detail}")


def _quietly(read: Callable[[], Any]) -> Any:
    """A read from the result backend; None when it cannot be reached just now."""
    try:
        return read()
    except Exception:  # noqa: BLE001 - the run's record in PostgreSQL is what we follow
        return None


def check_workers(app: Any, queues: list[str], config: Settings) -> None:
    """Fail fast, with a hint, unless some worker consumes each of ``queues``.

    On a connection of its own each time: one kept from before a broker
    restart would say the broker cannot be reached while it answers.
    """
    with _broker_errors(config), app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=5)
        replies = app.control.inspect(timeout=1.5, connection=conn).active_queues() or {}
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


def check_result_backend(app: Any, config: Settings) -> None:
    """Fail fast, naming CELERY_RESULT_BACKEND, when the result backend cannot be reached.

    Celery's Redis result backend retries a connection that fails (a wrong
    certificate, a server down) for about 30 s, then raises RuntimeError
    ("Retry limit exceeded"): one PING here tells first, in one line.
    """
    from redis.exceptions import RedisError

    client = getattr(app.backend, "client", None)  # Redis backends only (not rpc://)
    if client is None or not hasattr(client, "ping"):
        return
    try:
        client.ping()
    except RedisError as exc:
        detail = one_line(str(exc))
        for password in passwords_in([config.result_backend]):
            detail = detail.replace(password, "***")
        raise ServiceUnavailable(
            "the Celery result backend",
            "CELERY_RESULT_BACKEND",
            f"{redact_url(config.result_backend)}: {detail}",
        ) from exc


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
        from kombu.exceptions import OperationalError
        from redis.exceptions import ConnectionError as RedisConnectionError

        if isinstance(exc, RuntimeError) and "result store backend" in str(exc):
            # Celery's Redis result backend gave up reconnecting (about 30 s).
            raise ServiceUnavailable(
                "the Celery result backend",
                "CELERY_RESULT_BACKEND",
                f"{redact_url(self.config.result_backend)}: it stopped answering",
            ) from exc
        if isinstance(exc, OperationalError | ConnectionError | RedisConnectionError):
            raise ServiceUnavailable(
                "the Celery broker",
                "CELERY_BROKER_URL",
                f"{redact_url(self.config.broker_url)}: {exc}",
            ) from exc
