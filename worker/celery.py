"""The Celery app: `celery -A worker worker | beat | flower`.

Configuration comes from the environment through worker.settings and is
assembled (with the reason for every reliability choice) in
worker.celery_config. The tasks are in worker.tasks.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from worker import flower_guard, process, watch
from worker.celery_config import build_config, signing_enabled
from worker.settings import get_settings
from worker.tls import tls_warning

# `celery -A worker flower` imports this module before Flower opens its port:
# refuse to serve Flower without authentication (see worker/flower_guard.py,
# a bottom module: importing it here runs no import upward).
flower_guard.check()

app = Celery("worker", include=["worker.tasks"])
_config = build_config(get_settings())
app.conf.update(_config)
# Celery reads CELERY_BROKER_URL and CELERY_RESULT_BACKEND from the environment
# before its configuration: make them say what the configuration says (a
# rediss:// URL with its certificate check, see worker/tls.py). Only when set:
# a URL read from <NAME>_FILE never goes into the environment.
for _variable, _key in (
    ("CELERY_BROKER_URL", "broker_url"),
    ("CELERY_RESULT_BACKEND", "result_backend"),
):
    if os.environ.get(_variable, "").strip():
        os.environ[_variable] = _config[_key]
if signing_enabled(get_settings()):
    # Registers the `auth` serializer (signing with CELERY_SECURITY_KEY) and
    # disables every serializer but JSON, which results and events still use.
    app.setup_security(allowed_serializers=["json"], serializer="json")


@signals.worker_process_init.connect
def _open_after_fork(**_: Any) -> None:
    # Connection pools are opened in each pool process, after the fork.
    process.after_fork()


@signals.worker_process_shutdown.connect
def _close_on_exit(**_: Any) -> None:
    process.close()


@signals.beat_init.connect
def _beat_started(**_: Any) -> None:
    # Beat says it is alive (an owner lock in PostgreSQL) and serves the
    # Prometheus metrics on METRICS_PORT: see worker/beat_presence.py.
    from worker import beat_presence, celery_health, metrics

    settings = get_settings()

    def serve(config: Any) -> bool:
        return metrics.serve(config, lambda: celery_health.count_workers(app, config))

    beat_presence.start(settings, serve)


@signals.worker_init.connect
@signals.beat_init.connect
def _warn_unchecked_tls(**_: Any) -> None:
    # Once per worker or beat (its main process), never per connection.
    warning = tls_warning(get_settings())
    if warning:
        logging.getLogger("worker.tls").warning(warning)


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
