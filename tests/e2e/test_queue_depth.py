"""The supervisor's view of a queue's depth, as the broker holds it.

The supervisor (worker/supervise.py) sends a batch again only when its queue is
empty: a batch still queued will run. With a Redis broker and CELERY_KEY_PREFIX
(which every test here and many deployments set), kombu's passive queue declare
asks EXISTS without the prefix and so found no queue at all: every queue looked
empty and batches still queued were sent again (harmless copies, found while
testing several hosts). The depth is asked in a child process, as a worker does,
with the test's own prefixes, on both brokers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.e2e.conftest import delete_amqp_queues

REPO = Path(__file__).resolve().parents[2]
PROBE = """
import json, sys
from worker.celery import app
from worker.celery_runs import queue_depth
queue = sys.argv[1]
before = queue_depth(queue)
with app.producer_or_acquire() as producer:
    for n in range(3):
        app.send_task("worker.tasks.no_such_task", args=[n], queue=queue, producer=producer)
print(json.dumps({"before": before, "after": queue_depth(queue),
                  "unknown": queue_depth(queue + ".nobody")}))
"""


def test_queue_depth_counts_queued_messages_under_the_key_prefix(celery_env, broker):
    # A queue no worker consumes: the three messages stay where they are sent.
    queue = f"{celery_env['CELERY_QUEUE_PREFIX']}depth-probe"
    try:
        done = subprocess.run(
            [sys.executable, "-c", PROBE, queue],
            env={**os.environ, **celery_env},
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        if broker == "amqp":
            delete_amqp_queues(celery_env["CELERY_BROKER_URL"], [queue])
    assert done.returncode == 0, done.stderr
    depths = json.loads(done.stdout.strip().splitlines()[-1])
    assert depths == {"before": 0, "after": 3, "unknown": 0}
