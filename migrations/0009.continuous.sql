-- Continuous protection (worker/watch.py finds changed sessions, worker/continuous.py
-- backs them up): the sessions seen changed in Redis and not yet in PostgreSQL,
-- the watcher's heartbeat, and what continuous backups did, per shard per minute.
-- depends: 0008.run-batches

-- One row per session with a change not yet backed up. A session written a
-- thousand times a second is still one row: that is the coalescing.
CREATE TABLE continuous_pending (
    session_id     uuid PRIMARY KEY,
    shard          integer NOT NULL,
    -- The oldest change seen and not yet backed up. The recovery point is the
    -- age of the oldest of these (now() - min(changed_at)).
    changed_at     timestamptz NOT NULL,
    -- Set when a drain task has taken the session; a change seen while it
    -- works sets changed_again, so the session stays pending after it.
    claimed_by     text,
    claimed_at     timestamptz,
    changed_again  timestamptz,
    -- Backups of it that failed in a row (a server down); it waits longer each time.
    failures       integer NOT NULL DEFAULT 0,
    retry_after    timestamptz
);

CREATE INDEX continuous_pending_shard_idx ON continuous_pending (shard, changed_at);

-- The watcher that is active (one per deployment: an advisory lock elects it
-- among the workers) says it is alive here, and when its last sweep ended.
-- heartbeat_at is written every 2 s (worker/watch.py HEARTBEAT_INTERVAL_S);
-- older than 10 s (STALE_AFTER_S) means no watcher is active.
-- `dnd-client status` and the metrics count the recovery point from the last
-- heartbeat when the watcher is gone, so the lag keeps rising with no worker.
CREATE TABLE continuous_watcher (
    id              boolean PRIMARY KEY DEFAULT true CHECK (id),
    node            text NOT NULL,
    started_at      timestamptz NOT NULL DEFAULT now(),
    heartbeat_at    timestamptz NOT NULL DEFAULT now(),
    -- Keyspace notifications: 'on', 'enabled' (the watcher set them), 'off' (refused).
    notifications   text NOT NULL,
    last_sweep_at   timestamptz,
    last_sweep_sessions bigint,
    last_sweep_seconds  double precision
);

-- What continuous backups did, one row per shard per minute: an operator can
-- sum it, and `backup list` (persistence_snapshots) is not flooded by it.
CREATE TABLE continuous_activity (
    minute        timestamptz NOT NULL,
    shard         integer NOT NULL,
    backups       bigint NOT NULL DEFAULT 0,
    sessions      bigint NOT NULL DEFAULT 0,
    messages      bigint NOT NULL DEFAULT 0,
    kept_records  bigint NOT NULL DEFAULT 0,
    failures      bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (minute, shard)
);
