"""How many Celery workers serve this deployment, asked of the broker (for status and metrics)."""

from __future__ import annotations

from typing import Any

from worker.celery_config import all_queues
from worker.health import Workers
from worker.settings import Settings, redact_url

# How long a broadcast waits for workers to answer: a worker busy in a task
# still answers (its main process does), so a second is plenty.
REPLY_TIMEOUT_S = 1.0


def count_workers(app: Any, settings: Settings, timeout: float = REPLY_TIMEOUT_S) -> Workers:
    """Workers consuming at least one of our queues (not the other deployments on the broker).

    On a connection of its own each time, as worker/cli/dispatch.check_workers
    does. A broker that cannot be reached is a count of None with the reason.
    """
    ours = set(all_queues(settings))
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            replies = app.control.inspect(timeout=timeout, connection=conn).active_queues() or {}
    except Exception as exc:  # noqa: BLE001 - any broker failure means "cannot tell"
        reason = str(exc).replace(settings.broker_url, redact_url(settings.broker_url))
        return Workers(None, f"the Celery broker cannot be reached ({reason})")
    count = sum(1 for queues in replies.values() if ours & {q["name"] for q in queues or ()})
    return Workers(count)
