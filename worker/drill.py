"""Restore drills: restore into another Redis (or another prefix), then verify it.

This is how an operator proves that a backup restores, at no risk: the live
data is never written. A drill runs in the process that starts it: sending the
target's URL (and its password) through the broker would show it in Flower.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import redis.cluster

from worker.connections import DataRedis, connect_data_redis, is_cluster_node, redis_errors
from worker.errors import InvalidArgument
from worker.keys import RedisKeys
from worker.models import RestoreOptions, Run, VerifyOptions
from worker.redis_store import RedisStore
from worker.runner import Progress, run_local
from worker.services import Services
from worker.settings import redact_url


@dataclass(frozen=True, slots=True)
class DrillReport:
    restore: Run
    verify: Run
    target: str  # redacted URL and prefix
    cleaned_up: int | None  # keys removed afterwards, when asked


def run_drill(
    services: Services,
    *,
    target_url: str | None,
    target_prefix: str | None,
    session_id: str | None = None,
    force: bool = False,
    as_of: str | None = None,
    cleanup: bool = False,
    restore_progress: Progress | None = None,
    verify_progress: Progress | None = None,
) -> DrillReport:
    """Restore (all sessions, or one) into the target, verify the target, report."""
    settings = services.settings
    prefix = settings.redis_key_prefix if target_prefix is None else target_prefix
    url, client = _connect_target(services, target_url)
    target = RedisStore(client, RedisKeys(prefix), url)
    try:
        _refuse_live_target(services, target.client, url, prefix)
        drill = Services(
            settings=settings, pg=services.pg, redis=target, worker_name=services.worker_name
        )
        label = f"{redact_url(url)} prefix {prefix!r}"
        details = {"drill": True, "target": label}
        ids = None if session_id is None else [session_id]
        # Not live data: nothing it replaces goes into history.
        restore = RestoreOptions(force=force, as_of=as_of, keep_replaced=False)
        restored = run_local(
            drill, restore, session_ids=ids, progress=restore_progress,
            details=details,
        )  # fmt: skip
        verified = run_local(
            drill,
            VerifyOptions(as_of=as_of),
            session_ids=ids,
            progress=verify_progress,
            details=details,
        )
        removed = _delete_prefix(target.client, url, prefix) if cleanup else None
        return DrillReport(restore=restored, verify=verified, target=label, cleaned_up=removed)
    finally:
        target.client.close()


def verify_target(
    services: Services,
    options: VerifyOptions,
    *,
    target_url: str | None,
    target_prefix: str | None,
    session_id: str | None = None,
    progress: Progress | None = None,
) -> Run:
    """Verify another Redis or prefix (a drill's copy) against PostgreSQL, in this process.

    With ``options.as_of``: against the state history holds for that moment.
    Read-only: the target may be anything, the live data included.
    """
    settings = services.settings
    prefix = settings.redis_key_prefix if target_prefix is None else target_prefix
    url, client = _connect_target(services, target_url)
    target = RedisStore(client, RedisKeys(prefix), url)
    try:
        on_target = Services(
            settings=settings, pg=services.pg, redis=target, worker_name=services.worker_name
        )
        details = {"target": f"{redact_url(url)} prefix {prefix!r}"}
        ids = None if session_id is None else [session_id]
        return run_local(on_target, options, session_ids=ids, progress=progress, details=details)
    finally:
        target.client.close()


def _connect_target(services: Services, target_url: str | None) -> tuple[str, DataRedis]:
    """The target's URL and a client of it: another Redis, or the live one."""
    settings = services.settings
    if not target_url:
        # The live Redis (behind Sentinel: the primary they name).
        return settings.redis_url, connect_data_redis(settings)
    # An error connecting names the option that gave the URL, not REDIS_URL.
    # Another Redis may be a cluster or not, whatever REDIS_CLUSTER says.
    cluster = is_cluster_node(target_url, setting="--target-redis")
    settings = replace(settings, redis_cluster=cluster, redis_sentinels=())
    return target_url, connect_data_redis(settings, target_url, setting="--target-redis")


def _refuse_live_target(services: Services, client: DataRedis, url: str, prefix: str) -> None:
    """The target must not be the live data: another prefix, or another Redis."""
    settings = services.settings
    live = settings.redis_key_prefix
    # Prefixes apart: no key of one is a key of the other. One that starts
    # with the other shares keys with it: the restore would write among the
    # live keys, and --cleanup (which deletes `{prefix}*`) would delete some.
    if not (prefix.startswith(live) or live.startswith(prefix)):
        return
    if not prefix and not live:
        raise InvalidArgument("a drill target needs a key prefix of its own (--target-prefix)")
    # The target must be another server (or another database index). URLs can
    # differ and still name one server (localhost and 127.0.0.1), so ask both
    # servers who they are.
    with redis_errors(url, "--target-redis"):
        target_id = _identity(client)
    with redis_errors(settings.redis_url):
        live_id = _identity(services.redis.client)
    if target_id == live_id:
        same = "same prefix" if prefix == live else f"prefix {prefix!r} overlaps {live!r}"
        raise InvalidArgument(
            f"the drill target is the live data (same Redis, same database, {same}); "
            "give another --target-prefix or another --target-redis"
        )


def _identity(client: DataRedis) -> tuple[str, int]:
    if isinstance(client, redis.cluster.RedisCluster):
        # A cluster: the IDs of its nodes, as any node knows them.
        nodes = client.cluster_nodes()
        return ",".join(sorted(str(node["node_id"]) for node in nodes.values())), 0
    info = client.info("server")
    # The database the client uses (redis-py reads ?db= before the URL's path).
    database = int(client.connection_pool.connection_kwargs.get("db") or 0)
    return str(info["run_id"]), database


def _delete_prefix(client: DataRedis, url: str, prefix: str) -> int:
    removed = 0
    with redis_errors(url, "--target-redis"):
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{_glob_escape(prefix)}*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += int(client.unlink(*batch))
                batch.clear()
        if batch:
            removed += int(client.unlink(*batch))
    return removed


def _glob_escape(text: str) -> str:
    return "".join(f"\\{ch}" if ch in "*?[]\\" else ch for ch in text)
