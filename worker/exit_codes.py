"""Exit statuses of `dnd-client` (and of `celery ... flower` refusing to start), by name.

Listed in the README and in docs/contract.md §4. A bottom module: it imports
nothing of ours, so every layer (the CLI, the dev stack, the Flower guard) can
use it without importing upward.
"""

OK = 0
# An unexpected error.
FAILURE = 1
# A bad argument or option (click's own usage errors exit 2 as well).
USAGE = 2
# The run finished, but some records could not be stored and were kept aside.
PARTIAL = 3
# The run failed: some sessions could not be backed up or restored.
RUN_FAILED = 4
# A server (PostgreSQL, Redis, the broker) cannot be reached.
UNAVAILABLE = 5
# No Celery worker is consuming the queues the work would go to.
NO_WORKERS = 6
# A setting (environment variable) is malformed.
CONFIG = 7
# The database schema is missing or out of date: run `dnd-client migrate up`.
SCHEMA = 8
# Waiting for a run took longer than --timeout; the run goes on without us.
TIMEOUT = 9
# --local full run refused: another full run of the same kind is running.
BUSY = 10
# verify: Redis and the backup differ (details on stdout).
DIFFERENCES = 11
# status: the recovery point is above --max-lag (CONTINUOUS_MAX_LAG): a probe's "unhealthy".
LAG_EXCEEDED = 12
# Interrupted by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED = 130
# Asked to stop by SIGTERM (128 + SIGTERM): a deploy, `kill`, a container stop.
TERMINATED = 143
