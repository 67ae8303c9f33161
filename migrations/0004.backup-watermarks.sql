-- What the last backup of each session saw in Redis, so that the next one can
-- tell cheaply whether anything changed and which messages to read.
-- depends: 0003.kept-records

CREATE TABLE backup_watermarks (
    session_id     uuid PRIMARY KEY REFERENCES client_sessions (id) ON DELETE CASCADE,
    -- blake2b-128 of the session hash as last stored.
    hash_digest    bytea,
    -- Members of the messages zset read so far with a score <= max_score. If
    -- Redis now counts more members up to max_score, a message arrived late with
    -- an old timestamp and the next backup rescans the whole session.
    message_count  bigint NOT NULL,
    max_score      double precision,
    snapshot_id    uuid,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
