"""The project's own exceptions.

Driver errors (psycopg, redis-py, kombu) are wrapped into these at the store
boundary, so the engine, the tasks and the CLI only ever handle this small
hierarchy. Messages never contain passwords: URLs are redacted before they are
put into an error (see :func:`worker.settings.redact_url`).
"""

from __future__ import annotations


class DndError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(DndError):
    """A setting (environment variable) is missing or malformed."""


class InvalidArgument(DndError):
    """A caller passed a value we refuse, e.g. a session ID that is not a UUID."""


class TransientError(DndError):
    """Worth retrying later: the same work may well succeed then."""


class ServiceUnavailable(TransientError):
    """A server (PostgreSQL, Redis, the broker) cannot be reached.

    ``service`` names the server and ``setting`` the environment variable that
    points at it, so the CLI can say what to change.
    """

    def __init__(self, service: str, setting: str, detail: str) -> None:
        self.service = service
        self.setting = setting
        self.detail = detail
        # The constructor's arguments, so that a copy can be made from them: a
        # task's error reaches the CLI through Celery's result backend that way.
        super().__init__(service, setting, detail)

    def __str__(self) -> str:
        return f"cannot reach {self.service} ({self.detail}); check {self.setting}"


class SchemaNotReady(DndError):
    """The PostgreSQL schema is missing or older than this code needs."""


class StoreError(DndError):
    """A server answered with an error that is not a connection problem."""


class LockTimeout(TransientError):
    """Another backup or restore of the same session held it for too long."""


class TaskFailed(DndError):
    """A task on the workers failed with an error that is not one of ours."""


class NoWorkers(DndError):
    """No Celery worker answered; nothing would ever run the work."""


class MessageConflict(StoreError):
    """The fast COPY path met a message ID that is already stored.

    Internal: the backup engine answers it by redoing the batch through the
    merge path, which handles such IDs one by one.
    """


class RunInProgress(DndError):
    """A full run of this kind is already running (at most one at a time)."""

    def __init__(self, kind: str, run_id: str) -> None:
        self.kind = kind
        self.run_id = run_id
        super().__init__(kind, run_id)

    def __str__(self) -> str:
        return f"a full {self.kind} is already running: run {self.run_id}"


class WaitTimeout(DndError):
    """The CLI stopped waiting for a run; the run itself goes on."""

    def __init__(self, run_id: str, seconds: float) -> None:
        self.run_id = run_id
        self.seconds = seconds
        super().__init__(run_id, seconds)

    def __str__(self) -> str:
        return (
            f"stopped waiting after {self.seconds:g} s; run {self.run_id} goes on "
            f"(follow it: dnd-client backup show {self.run_id})"
        )


class Terminated(KeyboardInterrupt):
    """The process was asked to stop (SIGTERM): it stops as Ctrl-C stops it.

    A KeyboardInterrupt, so that whatever cleans up after Ctrl-C (a --local
    run marking itself failed) does so after SIGTERM too: a deploy, `kill`, a
    container stop.
    """
