"""The Celery app: `celery -A worker worker | beat | flower`.

Configuration comes from the environment through worker.settings and is
assembled (with the reason for every reliability choice) in
worker.celery_config. The tasks are in worker.tasks.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker import flower_guard, process, watch
from worker.celery_config import build_config
from worker.settings import get_settings

# `celery -A worker flower` imports this module before Flower opens its port:
# refuse to serve Flower without authentication (see worker/flower_guard.py,
# a bottom module: importing it here runs no import upward).
flower_guard.check()

app = Celery("worker", include=["worker.tasks"])
app.conf.update(build_config(get_settings()))


@signals.worker_process_init.connect
def _open_after_fork(**_: Any) -> None:
    # Connection pools are opened in each pool process, after the fork.
    process.after_fork()


@signals.worker_process_shutdown.connect
def _close_on_exit(**_: Any) -> None:
    process.close()


@signals.worker_ready.connect
def _start_watcher(sender: Any = None, **_: Any) -> None:
    # In the worker's main process, once its pool has forked: a thread started
    # before the fork would not exist in the pool's processes anyway, but its
    # sockets would. One watcher per deployment is active (worker/watch.py).
    node = str(getattr(sender, "hostname", None) or "celery")
    watch.start(get_settings(), app, node)


@signals.worker_shutdown.connect
def _stop_watcher(**_: Any) -> None:
    watch.stop()
