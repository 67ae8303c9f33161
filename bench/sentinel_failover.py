"""How long the application's data client is without Redis when a Sentinel primary dies.

    python bench/sentinel_failover.py [--repeat K] [--down-after-ms MS] [--json]

Starts a primary, two replicas and three sentinels (quorum 2) on free ports, opens
the data client as the workers do (REDIS_SENTINELS), and K times: SIGKILLs the
current primary and measures

  promoted     from the SIGKILL until a sentinel names another primary
  client gap   from the SIGKILL until a command of the client succeeds (the
               client's own retries, worker/connections.py)
  failed       commands whose retries ran out before that (in a worker, the task
               is then retried by Celery)

then starts the dead server again as a replica for the next round. The sentinels'
down-after-milliseconds (default here 1000; Redis's default is 30000) is the
dominant term: the figures are for the value given. Everything runs on 127.0.0.1
and is stopped at the end. Exit 0; 1 when a round could not be measured.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.servers import SentinelGroup
from worker.connections import connect_data_redis
from worker.settings import Settings


def one_round(group: SentinelGroup, client: object) -> tuple[float, float, int]:
    """(promoted, client gap, commands that failed in between) for one SIGKILL."""
    old = group.primary_port()
    promoted: list[float] = []

    def watch() -> None:
        while time.monotonic() - killed < 120:
            if group.primary_port() != old:
                promoted.append(time.monotonic() - killed)
                return
            time.sleep(0.01)

    group.server(old).kill()
    killed = time.monotonic()
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    failed = 0
    while True:
        try:
            client.set("bench:failover", b"1")  # type: ignore[attr-defined]
        except Exception:
            failed += 1
            if time.monotonic() - killed > 120:
                raise RuntimeError("the client found no primary within 120 s") from None
            continue
        gap = time.monotonic() - killed
        break
    watcher.join(130)
    if not promoted:
        raise RuntimeError("no failover within 120 s")
    # Back as a replica of the new primary, for the next round.
    dead = group.server(old)
    dead.extra = ["--replicaof", "127.0.0.1", str(group.primary_port())]
    dead.start()
    group.wait_settled(len(group.servers) - 1, len(group.sentinels), timeout=60)
    return promoted[0], gap, failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--down-after-ms", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        group = SentinelGroup(Path(tmp), down_after_ms=args.down_after_ms)
        try:
            settings = Settings.from_env(
                {
                    "REDIS_URL": "redis://unused/0",
                    "REDIS_SENTINELS": group.addresses,
                    "REDIS_SENTINEL_MASTER": group.master,
                }
            )
            client = connect_data_redis(settings)
            rounds = []
            try:
                for _ in range(args.repeat):
                    rounds.append(one_round(group, client))
            except RuntimeError as exc:
                print(f"sentinel_failover: {exc}", file=sys.stderr)
                return 1
            finally:
                with contextlib.suppress(Exception):
                    client.close()
        finally:
            group.stop()
    promoted = [r[0] for r in rounds]
    gaps = [r[1] for r in rounds]
    figures = {
        "down_after_ms": args.down_after_ms,
        "rounds": len(rounds),
        "promoted_s": [round(x, 2) for x in promoted],
        "client_gap_s": [round(x, 2) for x in gaps],
        "client_gap_median_s": round(statistics.median(gaps), 2),
        "commands_failed": [r[2] for r in rounds],
    }
    if args.json:
        print(json.dumps(figures))
    else:
        print(f"down-after-milliseconds   {args.down_after_ms}")
        print(f"promoted (s)              {', '.join(f'{x:.2f}' for x in promoted)}")
        print(f"client gap (s)            {', '.join(f'{x:.2f}' for x in gaps)}")
        print(f"commands failed           {', '.join(str(r[2]) for r in rounds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
