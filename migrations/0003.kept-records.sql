-- Records from Redis that could not be stored faithfully, kept raw with the
-- reason, for an operator to inspect, fix in Redis, and mark resolved.
-- depends: 0002.run-records

CREATE TABLE persistence_kept_records (
    id                 bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind               text NOT NULL CHECK (kind IN ('session_id', 'session', 'message')),
    -- The Redis key the record was read from, and the IDs as far as they could
    -- be read (text: a bad record's "ID" is not necessarily a UUID).
    redis_key          text NOT NULL,
    session_id         text,
    message_id         text,
    score              double precision,
    reason             text NOT NULL,
    -- The exact bytes (a set member, a zset member, or a session hash encoded
    -- as a JSON object); bytea because they may hold NUL or invalid UTF-8.
    raw                bytea NOT NULL,
    raw_sha256         bytea NOT NULL,
    -- A readable copy of raw (invalid bytes escaped), for psql.
    preview            text NOT NULL,
    first_snapshot_id  uuid REFERENCES persistence_snapshots (id) ON DELETE SET NULL,
    last_snapshot_id   uuid REFERENCES persistence_snapshots (id) ON DELETE SET NULL,
    first_seen_at      timestamptz NOT NULL DEFAULT now(),
    last_seen_at       timestamptz NOT NULL DEFAULT now(),
    times_seen         integer NOT NULL DEFAULT 1,
    resolved_at        timestamptz,
    -- The same bad record seen by a later run is the same row, seen again.
    UNIQUE (redis_key, raw_sha256)
);

CREATE INDEX persistence_kept_records_open_idx ON persistence_kept_records (last_seen_at DESC)
    WHERE resolved_at IS NULL;
CREATE INDEX persistence_kept_records_last_snapshot_idx
    ON persistence_kept_records (last_snapshot_id);
