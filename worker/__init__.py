"""Celery workers that back up a tabletop chat client's live Redis sessions into
PostgreSQL and restore them.

`celery -A worker ...` finds the Celery app in worker.celery (imported only
then, so that the CLI and the engine load without Celery).
"""

__version__ = "0.1.0"
