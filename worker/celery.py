"""The Celery app: `celery -A worker worker | beat | flower`.

Configuration comes from the environment through worker.settings and is
assembled (with the reason for every reliability choice) in
worker.celery_config. The tasks are in worker.tasks.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from worker import flower_guard, process
from worker.celery_config import build_config, signing_enabled
from worker.settings import get_settings

# `celery -A worker flower` imports this module before Flower opens its port:
# refuse to serve Flower without authentication (see worker/flower_guard.py,
# a bottom module: importing it here runs no import upward).
flower_guard.check()

app = Celery("worker", include=["worker.tasks"])
app.conf.update(build_config(get_settings()))
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
